//! The audit log's hash chain, computed the same way by every store.
//!
//! `hash = sha256(prev_hash "\n" seq "\n" at "\n" request_id "\n" actor "\n" event "\n" details)`
//! in lowercase hex, where `at` is RFC 3339 UTC with microseconds and `details` is the
//! compact JSON text exactly as stored. The first entry's `prev_hash` is [`GENESIS`].

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::AuditEntry;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The canonical timestamp text hashed and stored (microsecond precision).
pub fn canonical_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The hash of one entry given the hash before it.
pub fn entry_hash(
    prev_hash: &str,
    seq: i64,
    at: DateTime<Utc>,
    request_id: Option<Uuid>,
    actor: &str,
    event: &str,
    details_json: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        prev_hash,
        &seq.to_string(),
        &canonical_time(at),
        &request_id.map(|u| u.to_string()).unwrap_or_default(),
        actor,
        event,
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    h.update(details_json.as_bytes());
    hex::encode(h.finalize())
}

/// Checks a run of entries in seq order, starting after (`prev_seq`, `prev_hash`).
/// Returns the first bad seq and why.
pub fn verify_entries<'a>(
    mut prev_seq: i64,
    mut prev_hash: String,
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<(i64, String), (i64, String)> {
    for e in entries {
        if e.seq != prev_seq + 1 {
            return Err((
                e.seq,
                format!("entry {} follows {}: entries are missing", e.seq, prev_seq),
            ));
        }
        if e.prev_hash != prev_hash {
            return Err((
                e.seq,
                format!("entry {} does not chain to the entry before", e.seq),
            ));
        }
        let details = serde_json::to_string(&e.details).unwrap_or_default();
        let expect = entry_hash(
            &e.prev_hash,
            e.seq,
            e.at,
            e.request_id,
            &e.actor,
            &e.event,
            &details,
        );
        if expect != e.hash {
            return Err((
                e.seq,
                format!("entry {} was altered (hash mismatch)", e.seq),
            ));
        }
        prev_seq = e.seq;
        prev_hash = e.hash.clone();
    }
    Ok((prev_seq, prev_hash))
}
