//! The audit log's hash chain, computed the same way by every store.
//!
//! An entry's message is
//! `prev_hash "\n" seq "\n" at "\n" request_id "\n" actor "\n" event "\n" details`, where
//! `at` is RFC 3339 UTC with microseconds and `details` is the compact JSON text exactly as
//! stored. Its hash is the lowercase hex SHA-256 of the message, or, when the chain is keyed
//! (`CHIFFON_AUDIT_KEY`, kept outside the database), the HMAC-SHA256 of the message under
//! that key: then whoever can write the database but does not hold the key cannot rewrite
//! an entry and re-chain the rest. The first entry's `prev_hash` is [`GENESIS`].
//!
//! A log begun before a key was configured keeps its plain entries: verify accepts plain
//! entries only before the first keyed one, so once an entry is keyed every later one must
//! be (rewriting the tail without the key is caught).

use std::sync::Arc;

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

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|k| k ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The key of a keyed (HMAC) chain. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct AuditKey(Arc<[u8]>);

impl AuditKey {
    /// A key from its bytes; `None` for an empty key (a plain chain).
    pub fn new(bytes: impl AsRef<[u8]>) -> Option<Self> {
        let bytes = bytes.as_ref();
        (!bytes.is_empty()).then(|| AuditKey(Arc::from(bytes)))
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([REDACTED])")
    }
}

fn message(
    prev_hash: &str,
    seq: i64,
    at: DateTime<Utc>,
    request_id: Option<Uuid>,
    actor: &str,
    event: &str,
    details_json: &str,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(160 + actor.len() + event.len() + details_json.len());
    for part in [
        prev_hash,
        &seq.to_string(),
        &canonical_time(at),
        &request_id.map(|u| u.to_string()).unwrap_or_default(),
        actor,
        event,
    ] {
        m.extend_from_slice(part.as_bytes());
        m.push(b'\n');
    }
    m.extend_from_slice(details_json.as_bytes());
    m
}

/// The hash of one entry given the hash before it: HMAC-SHA256 under `key` when the chain
/// is keyed, SHA-256 otherwise.
#[allow(clippy::too_many_arguments)]
pub fn entry_hash(
    key: Option<&AuditKey>,
    prev_hash: &str,
    seq: i64,
    at: DateTime<Utc>,
    request_id: Option<Uuid>,
    actor: &str,
    event: &str,
    details_json: &str,
) -> String {
    let m = message(prev_hash, seq, at, request_id, actor, event, details_json);
    match key {
        Some(k) => hex::encode(hmac_sha256(&k.0, &m)),
        None => hex::encode(Sha256::digest(&m)),
    }
}

/// Where a verification stands after the entries it has checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCursor {
    pub seq: i64,
    pub hash: String,
    /// The first entry found keyed, once one is.
    pub keyed_since: Option<i64>,
}

impl Default for ChainCursor {
    fn default() -> Self {
        ChainCursor {
            seq: 0,
            hash: GENESIS.to_string(),
            keyed_since: None,
        }
    }
}

/// Checks a run of entries in seq order, continuing from `at`. With a key, an entry must
/// carry its HMAC, except plain entries written before the first keyed one (a log begun
/// before the key was configured). Returns the first bad seq and why.
pub fn verify_entries<'a>(
    key: Option<&AuditKey>,
    at: &mut ChainCursor,
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<(), (i64, String)> {
    for e in entries {
        if e.seq != at.seq + 1 {
            return Err((
                e.seq,
                format!("entry {} follows {}: entries are missing", e.seq, at.seq),
            ));
        }
        if e.prev_hash != at.hash {
            return Err((
                e.seq,
                format!("entry {} does not chain to the entry before", e.seq),
            ));
        }
        let details = serde_json::to_string(&e.details).unwrap_or_default();
        let m = message(
            &e.prev_hash,
            e.seq,
            e.at,
            e.request_id,
            &e.actor,
            &e.event,
            &details,
        );
        let plain = || hex::encode(Sha256::digest(&m)) == e.hash;
        match key {
            Some(k) if hex::encode(hmac_sha256(&k.0, &m)) == e.hash => {
                at.keyed_since.get_or_insert(e.seq);
            }
            Some(_) if plain() => {
                if let Some(first) = at.keyed_since {
                    return Err((
                        e.seq,
                        format!(
                            "entry {} is not keyed although entry {first} before it is: it was rewritten without CHIFFON_AUDIT_KEY",
                            e.seq
                        ),
                    ));
                }
            }
            Some(_) => {
                return Err((
                    e.seq,
                    format!(
                        "entry {} was altered (its HMAC does not match CHIFFON_AUDIT_KEY)",
                        e.seq
                    ),
                ));
            }
            None if plain() => {}
            None => {
                return Err((
                    e.seq,
                    format!(
                        "entry {} was altered (hash mismatch), or the chain is keyed and verify needs CHIFFON_AUDIT_KEY",
                        e.seq
                    ),
                ));
            }
        }
        at.seq = e.seq;
        at.hash = e.hash.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(key: Option<&AuditKey>, n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_string();
        let at = Utc::now();
        (1..=n)
            .map(|seq| {
                let details = json!({ "n": seq });
                let text = serde_json::to_string(&details).unwrap();
                let hash = entry_hash(key, &prev, seq, at, None, "engine", "received", &text);
                let e = AuditEntry {
                    seq,
                    at,
                    request_id: None,
                    actor: "engine".into(),
                    event: "received".into(),
                    details,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A key longer than the block is hashed first (RFC 4231 test case 6).
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_keyed_chain_verifies_only_with_its_key() {
        let key = AuditKey::new("k1").unwrap();
        let entries = chain(Some(&key), 3);
        verify_entries(Some(&key), &mut ChainCursor::default(), &entries).unwrap();
        let other = AuditKey::new("k2").unwrap();
        let (seq, why) =
            verify_entries(Some(&other), &mut ChainCursor::default(), &entries).unwrap_err();
        assert_eq!(seq, 1);
        assert!(why.contains("HMAC"), "{why}");
        let (_, why) = verify_entries(None, &mut ChainCursor::default(), &entries).unwrap_err();
        assert!(why.contains("CHIFFON_AUDIT_KEY"), "{why}");
        assert!(format!("{key:?}").contains("REDACTED"));
        assert!(AuditKey::new("").is_none());
    }

    #[test]
    fn a_rechained_tail_without_the_key_is_caught() {
        let key = AuditKey::new("k1").unwrap();
        let mut entries = chain(Some(&key), 4);
        // A database writer without the key rewrites entry 3 and re-chains 3 and 4 as a
        // plain chain: entry 3 is plain after keyed entries.
        entries[2].details = json!({ "n": "forged" });
        let mut prev = entries[1].hash.clone();
        for e in entries.iter_mut().skip(2) {
            let text = serde_json::to_string(&e.details).unwrap();
            e.prev_hash = prev.clone();
            e.hash = entry_hash(None, &prev, e.seq, e.at, None, &e.actor, &e.event, &text);
            prev = e.hash.clone();
        }
        let (seq, why) =
            verify_entries(Some(&key), &mut ChainCursor::default(), &entries).unwrap_err();
        assert_eq!(seq, 3);
        assert!(why.contains("not keyed"), "{why}");
    }

    #[test]
    fn plain_entries_before_the_key_was_configured_are_accepted() {
        let key = AuditKey::new("k1").unwrap();
        let mut entries = chain(None, 2);
        let mut prev = entries[1].hash.clone();
        for seq in 3..=4 {
            let details = json!({ "n": seq });
            let text = serde_json::to_string(&details).unwrap();
            let at = Utc::now();
            let hash = entry_hash(Some(&key), &prev, seq, at, None, "engine", "planned", &text);
            entries.push(AuditEntry {
                seq,
                at,
                request_id: None,
                actor: "engine".into(),
                event: "planned".into(),
                details,
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        let mut cursor = ChainCursor::default();
        verify_entries(Some(&key), &mut cursor, &entries).unwrap();
        assert_eq!(cursor.keyed_since, Some(3));
        assert_eq!(cursor.seq, 4);
    }
}
