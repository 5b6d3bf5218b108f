//! The one SQL implementation of [`Store`], shared by PostgreSQL and SQLite.
//!
//! The statements, the row conversions and the transaction boundaries are written once, in
//! [`sql_store!`]; each backend module expands it over its own small dialect:
//!
//! - placeholders: `$N` everywhere (sqlx's SQLite driver binds `$N` by number too);
//! - SQL fragments passed to the macro: the row lock of a read-before-write
//!   (`FOR UPDATE` / nothing: SQLite's `BEGIN IMMEDIATE` already holds the one write lock),
//!   the claim's `SKIP LOCKED`, "status is one of the list in a group's `v_from` column"
//!   (`= ANY(v_from)` / `IN (SELECT value FROM json_each(v_from))`), and whether the audit
//!   head may move in a data-modifying `WITH` of the entries' `INSERT` (PostgreSQL) or in
//!   its own statement;
//! - items the module defines: `BEGIN_WRITE` and `BEGIN_SNAPSHOT` (the statements that open
//!   a writing and a consistent-reading transaction), `ts`, `ts_col` and `opt_ts_col` (the
//!   stored form of an instant: TIMESTAMPTZ, or fixed-format RFC 3339 text that sorts like
//!   the instant), `status_list` (the bound form of a status list) and `db_err` (the error
//!   classification: which errors are transient, which are conflicts).
//!
//! Connecting (pool options, pragmas, migrations) stays in each module. The conformance suite
//! ([`super::conformance`]) runs the same cases against both expansions.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use crate::audit::chain::{self, AuditKey};
use crate::model::{
    AuditEntry, AuditVerification, GroupWrite, NewAuditEntry, RequestStatus, Written,
};

/// Rows per multi-row INSERT (PostgreSQL allows 65535 bound parameters per statement,
/// SQLite 32766).
pub(super) const INSERT_CHUNK: usize = 500;
/// Rows up to which a multi-row statement whose text grows with its rows is kept prepared
/// on its connection (a few statements per kind; above, unnamed: measured, a statement kept
/// for every row count held 8-12 MiB more in the benchmark process, and one request at
/// a time, whose entries and log lines come two or three at once, pays a second round trip
/// for an unnamed one).
pub(super) const PREPARED_ROWS: usize = 4;
/// Audit rows read per round trip while verifying.
pub(super) const VERIFY_PAGE: i64 = 1000;
/// `list_requests` without a limit.
pub(super) const DEFAULT_LIST_LIMIT: u32 = 100;

macro_rules! req_cols {
    () => {
        "id, trace_id, text, requester, submitted_by, dry_run, status, plan, approver, approval_comment, \
         error, commit_id, created_at, updated_at"
    };
}

macro_rules! step_cols {
    () => {
        "task_id, request_id, seq, action, parameters, agent_type, resources, status, attempt, \
         agent_id, queue, CASE WHEN broker_attempt = attempt THEN broker_user END AS broker_user, \
         progress, output, diff, changed, error, ready_at, dispatched_at, \
         deadline_at, finished_at, not_before, preview"
    };
}

macro_rules! audit_cols {
    () => {
        "seq, at, request_id, actor, event, details, prev_hash, hash"
    };
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// Now, at the precision both stores keep (microseconds).
pub(super) fn now() -> DateTime<Utc> {
    trunc(Utc::now())
}

pub(super) fn trunc(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

pub(super) fn sat_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Why a conditional update of request `id` from `from` changed nothing: it is unknown, or
/// its status (`current`) is another.
pub(super) fn why_not(id: Uuid, from: RequestStatus, current: Option<String>) -> StoreError {
    match current {
        None => StoreError::not_found(format!("request {id}")),
        Some(s) => StoreError::Conflict {
            message: format!("request {id} is {s}, not {from}"),
            current: Some(s),
        },
    }
}

pub(super) fn step_conflict(task_id: Uuid, current: Option<String>) -> StoreError {
    match current {
        None => StoreError::not_found(format!("step {task_id}")),
        Some(s) => StoreError::Conflict {
            message: format!("step {task_id} is {s}"),
            current: Some(s),
        },
    }
}

/// An audit row's details, and why the row cannot verify when they are not the JSON text
/// the chain hashed (the row was altered; unparsable details come back as a JSON string).
pub(super) fn audit_details(seq: i64, text: String) -> (serde_json::Value, Option<String>) {
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) if serde_json::to_string(&v).ok().as_deref() == Some(text.as_str()) => (v, None),
        parsed => (
            parsed.unwrap_or(serde_json::Value::String(text)),
            Some(format!(
                "entry {seq} was altered (details are not the JSON that was hashed)"
            )),
        ),
    }
}

/// The JSON text each entry's details are stored (and hashed) as.
pub(super) fn details_texts(entries: &[NewAuditEntry]) -> Result<Vec<String>, StoreError> {
    entries
        .iter()
        .map(|e| serde_json::to_string(&e.details))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Backend(Box::new(e)))
}

/// Chains `entries` (with their details `texts`) after the head `(seq, hash)`: the rows to
/// insert, and the new head.
pub(super) fn chain_entries(
    key: Option<&AuditKey>,
    (mut seq, mut prev): (i64, String),
    entries: &[NewAuditEntry],
    texts: &[String],
    at: DateTime<Utc>,
) -> (Vec<AuditEntry>, i64, String) {
    let mut out = Vec::with_capacity(entries.len());
    for (e, text) in entries.iter().zip(texts) {
        seq += 1;
        let hash = chain::entry_hash(
            key,
            &prev,
            seq,
            at,
            e.request_id,
            &e.actor,
            e.event.as_str(),
            text,
        );
        out.push(AuditEntry {
            seq,
            at,
            request_id: e.request_id,
            actor: e.actor.clone(),
            event: e.event.as_str().to_string(),
            details: e.details.clone(),
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    (out, seq, prev)
}

/// Rows per multi-row statement of a group commit (a step change binds 17 parameters).
pub(super) const BATCH_ROWS: usize = 256;

/// A group's outcomes as its writes are applied ([`super::waves`]): each write's slot, the
/// audit entries of those that applied (in the order they did), and the requests stored
/// naming the position of their newest entry, corrected once the chain's head is known.
pub(super) struct Applied {
    /// Where the chain's head is expected before the group (the rows' positions assume it).
    pub base: i64,
    out: Vec<Option<Result<Written, StoreError>>>,
    pub entries: Vec<NewAuditEntry>,
    /// Requests stored naming an entry position: (id, the position assumed, where their
    /// newest entry is among `entries`, counted from one).
    stored: Vec<(Uuid, i64, i64)>,
    /// Moves to `running` that ride with their queued plan: plan's write → the move's
    /// ([`super::waves::then_running`]).
    pub riders: std::collections::HashMap<usize, usize>,
}

impl Applied {
    pub fn new(base: i64, writes: &[GroupWrite]) -> Self {
        Applied {
            base,
            out: (0..writes.len()).map(|_| None).collect(),
            entries: Vec::new(),
            stored: Vec::new(),
            riders: super::waves::then_running(writes),
        }
    }

    /// The requests whose stored position is wrong when the chain's head was at `head`
    /// before the group: (id, actual position). Rows not applied move later entries up,
    /// and a head not where [`Applied::base`] expected it moves them all.
    pub fn fixes(&self, head: i64) -> Vec<(Uuid, i64)> {
        self.stored
            .iter()
            .filter(|(_, assumed, at)| head + at != *assumed)
            .map(|(id, _, at)| (*id, head + at))
            .collect()
    }

    /// The chain positions a batch's rows (carrying `audits`) name if all of them apply.
    pub fn assume(&self, audits: &[&[NewAuditEntry]]) -> Vec<Option<i64>> {
        let counts: Vec<usize> = audits.iter().map(|a| a.len()).collect();
        super::waves::assumed_seqs(self.base, self.entries.len(), &counts)
    }

    /// Records write `i`'s outcome, in the order of its batch's rows: one that applied
    /// appends its entries `audit`. `stored`: the request whose row was written naming
    /// position `assumed` (see [`Applied::assume`]), corrected if that is not where its
    /// entries went (nothing is corrected for a write that appends nothing).
    pub fn settle(
        &mut self,
        i: usize,
        slot: Result<Written, StoreError>,
        audit: &[NewAuditEntry],
        stored: Option<(Uuid, Option<i64>)>,
    ) {
        if slot.is_ok() && !audit.is_empty() {
            self.entries.extend(audit.iter().cloned());
            if let Some((id, Some(assumed))) = stored {
                self.stored.push((id, assumed, self.entries.len() as i64));
            }
        }
        if let Some(o) = self.out.get_mut(i) {
            *o = Some(slot);
        }
    }

    /// Every write's outcome, in order.
    pub fn finish(self) -> Vec<Result<Written, StoreError>> {
        self.out
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(StoreError::Corrupt("a write without its outcome".into())))
            })
            .collect()
    }
}

/// Where this store expects the audit chain's head to be when its next group reaches it:
/// the head it last moved, plus the entries of the groups in progress. A group's rows name
/// the positions of their requests' newest entries assuming that base; the head itself is
/// locked and read only after the group's own changes, just before its entries go in, and
/// the rows are corrected when it was elsewhere (another instance wrote, a group before
/// failed, rows did not apply). So groups of one store can run side by side: each waits
/// for the head only for its last statements and its commit, and the chain still goes in
/// the order the groups commit.
///
/// Groups take the head in the order they began ([`HeadCache::first_in_line`]), as their
/// bases assume: a group whose changes are made before those of a group that began earlier
/// waits for that one to lock the head first (at most [`HEAD_TURN_WAIT`], since the two
/// may wait on each other's rows). Taken out of order, both would correct every row.
#[derive(Debug, Default)]
pub(super) struct HeadCache {
    /// The last position this store moved the head to, or read it at.
    last: i64,
    /// Entries promised to groups in progress, after `last`.
    pending: i64,
    /// The next group's place in line.
    next: u64,
    /// The groups in progress that may still lock the head, by place in line.
    line: std::collections::BTreeSet<u64>,
}

/// A group's place in [`HeadCache`]'s line, from its beginning to its end: dropped, it
/// ends the group there (with `moved`, where the group's commit left the head), so a group
/// whose caller stopped waiting (its future dropped midway) neither holds up the groups
/// after it nor keeps its promised entries.
pub(super) struct InLine {
    head: std::sync::Arc<std::sync::Mutex<HeadCache>>,
    turn: std::sync::Arc<tokio::sync::Notify>,
    entries: usize,
    /// The base the group's rows assume, and its place in line.
    pub begun: (i64, u64),
    pub moved: Option<i64>,
}

impl InLine {
    /// A group carrying up to `entries` entries begins.
    pub fn begin(
        head: &std::sync::Arc<std::sync::Mutex<HeadCache>>,
        turn: &std::sync::Arc<tokio::sync::Notify>,
        entries: usize,
    ) -> InLine {
        let begun = head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(entries);
        InLine {
            head: head.clone(),
            turn: turn.clone(),
            entries,
            begun,
            moved: None,
        }
    }
}

impl InLine {
    /// Waits until the groups that began before this one have locked the chain's head (or
    /// will not), at most [`HEAD_TURN_WAIT`] (see [`HeadCache`]).
    pub async fn wait_turn(&self) {
        let deadline = tokio::time::Instant::now() + HEAD_TURN_WAIT;
        loop {
            let told = self.turn.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            let first = self
                .head
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first_in_line(self.begun.1);
            if first || tokio::time::timeout_at(deadline, told).await.is_err() {
                return;
            }
        }
    }

    /// This group holds the chain's head, or will not take it: the next one may.
    pub fn pass(&self) {
        self.head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .passed(self.begun.1);
        self.turn.notify_waiters();
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        self.head.lock().unwrap_or_else(|e| e.into_inner()).ended(
            self.entries,
            self.begun.1,
            self.moved,
        );
        self.turn.notify_waiters();
    }
}

/// Longest a group waits for the groups before it to lock the chain's head (see
/// [`HeadCache`]); then it goes ahead, and the rows are corrected.
pub(super) const HEAD_TURN_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

impl HeadCache {
    /// The base a new group carrying up to `entries` entries assumes, and its place in line;
    /// the group ends with [`HeadCache::ended`] and the same `entries` and place.
    pub fn begin(&mut self, entries: usize) -> (i64, u64) {
        let base = self.last + self.pending;
        self.pending += entries as i64;
        let place = self.next;
        self.next += 1;
        if entries > 0 {
            self.line.insert(place);
        }
        (base, place)
    }

    /// Whether no group that began before the one at `place` may still lock the head.
    pub fn first_in_line(&self, place: u64) -> bool {
        self.line.first().is_none_or(|first| *first >= place)
    }

    /// The group at `place` holds the head, or will not take it: the next one may.
    pub fn passed(&mut self, place: u64) {
        self.line.remove(&place);
    }

    /// A group that was promised `entries` ended; `head`: where it saw the chain's head
    /// last (moved by its commit, or read), if it did.
    pub fn ended(&mut self, entries: usize, place: u64, head: Option<i64>) {
        self.pending = (self.pending - entries as i64).max(0);
        self.line.remove(&place);
        if let Some(seq) = head {
            self.saw(seq);
        }
    }

    /// The head was seen at `seq` (moved there by this store, or read).
    pub fn saw(&mut self, seq: i64) {
        self.last = self.last.max(seq);
    }
}

/// The writes `idx` of a batch of one kind, each as `pick` reads it (with its index);
/// `pick` answers `None` for a write of another kind, a bug.
pub(super) fn batch_rows<'a, T>(
    writes: &'a [GroupWrite],
    idx: &[usize],
    pick: impl Fn(usize, &'a GroupWrite) -> Option<T>,
) -> Result<Vec<T>, StoreError> {
    idx.iter()
        .map(|&i| writes.get(i).and_then(|w| pick(i, w)).ok_or_else(misplaced))
        .collect()
}

/// The audit chain's head moved while this transaction held it (a bug or a tampered
/// database, never a race).
pub(super) fn head_moved() -> StoreError {
    StoreError::Corrupt("the audit chain's head moved while it was locked".into())
}

/// A write handed to the batch of another kind (a bug, not bad data).
pub(super) fn misplaced() -> StoreError {
    StoreError::Corrupt("a group write in the batch of another kind".into())
}

/// A planning claim that did not apply.
pub(super) fn claim_conflict(id: Uuid) -> StoreError {
    StoreError::Conflict {
        message: format!("request {id} is not planning or is claimed by another"),
        current: None,
    }
}

/// A failed verification: `checked` entries were fine, `seq` is the first bad one.
pub(super) fn unverified(checked: u64, seq: i64, why: String) -> AuditVerification {
    AuditVerification {
        ok: false,
        entries_checked: checked,
        first_bad_seq: Some(seq),
        problem: Some(why),
    }
}

/// The verdict once every row verified up to `cursor`: the rows must end at the chain's
/// head `(head_seq, head_hash)`.
pub(super) fn chain_verdict(
    checked: u64,
    cursor: &chain::ChainCursor,
    head_seq: i64,
    head_hash: &str,
) -> AuditVerification {
    if cursor.seq < head_seq {
        return unverified(
            checked,
            cursor.seq + 1,
            format!(
                "entries {}..={head_seq} were deleted (the chain's head is at {head_seq})",
                cursor.seq + 1
            ),
        );
    }
    if cursor.seq > head_seq {
        return unverified(
            checked,
            head_seq + 1,
            format!("entries after {head_seq} were added past the chain's head"),
        );
    }
    if cursor.hash != head_hash {
        return unverified(
            checked,
            head_seq,
            format!("entry {head_seq} does not match the chain's head"),
        );
    }
    AuditVerification {
        ok: true,
        entries_checked: checked,
        first_bad_seq: None,
        problem: None,
    }
}

/// Expands the store type `$Store` (a `$Pool` and an optional audit key), its
/// [`Store`](super::Store) implementation and its row conversions, for the database `$Db`
/// (rows `$Row`), in the calling module, over that module's dialect (see the module docs).
macro_rules! sql_store {
    (
        store: $Store:ident,
        db: $Db:ty,
        pool: $Pool:ty,
        row: $Row:ty,
        backend: $backend:literal,
        for_update: $for_update:literal,
        skip_locked: $skip_locked:literal,
        one_of_v: $one_of_v:literal,
        head_in_insert: $head_in_insert:literal,
        concurrent_groups: $concurrent_groups:literal $(,)?
    ) => {
        /// A [`Store`](crate::store::Store) over one connection pool. Cheap to clone (a pool
        /// handle).
        #[derive(Clone)]
        pub struct $Store {
            pool: $Pool,
            /// Keys the audit chain (HMAC) when set.
            audit_key: Option<AuditKey>,
            /// The audit chain's head as this store last moved it (see [`HeadCache`]).
            head: std::sync::Arc<std::sync::Mutex<HeadCache>>,
            /// Told when a group passes the head (see [`HeadCache::first_in_line`]).
            head_turn: std::sync::Arc<tokio::sync::Notify>,
        }

        impl std::fmt::Debug for $Store {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($Store)).finish_non_exhaustive()
            }
        }

        impl $Store {
            fn from_pool(pool: $Pool) -> Self {
                $Store {
                    pool,
                    audit_key: None,
                    head: Default::default(),
                    head_turn: Default::default(),
                }
            }

            /// Keys the audit chain with `key` (HMAC-SHA256): entries appended from now on are
            /// keyed, and verification needs the key. See [`chain`].
            pub fn with_audit_key(mut self, key: Option<AuditKey>) -> Self {
                self.audit_key = key;
                self
            }

            /// Closes the pool, waiting for connections in use to come back.
            pub async fn close(&self) {
                self.pool.close().await;
            }

            /// Runs raw SQL (tests use it to tamper with rows); returns the rows affected.
            #[cfg(feature = "test-utils")]
            pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
                let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected())
            }

            /// Appends `entries` to the audit chain inside `tx`. The head row's lock (or
            /// SQLite's write lock), held to commit, keeps concurrent appenders (other
            /// connections or instances) from forking the chain.
            async fn append_audit_in(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                entries: &[NewAuditEntry],
                head: Option<(i64, String)>,
            ) -> Result<Vec<AuditEntry>, StoreError> {
                let texts = details_texts(entries)?;
                let head = match head {
                    Some(head) => head,
                    None => Self::lock_audit_head(tx).await?,
                };
                let (out, seq, prev) =
                    chain_entries(self.audit_key.as_ref(), head, entries, &texts, now());
                // The head moves in the same statement as the first rows where the dialect
                // allows it (one round trip fewer per group).
                let mut head_pending = true;
                for (chunk, texts) in out.chunks(INSERT_CHUNK).zip(texts.chunks(INSERT_CHUNK)) {
                    let mut q = QueryBuilder::<$Db>::new("");
                    if $head_in_insert && head_pending {
                        head_pending = false;
                        q.push("WITH head AS (UPDATE audit_head SET last_seq = ");
                        q.push_bind(seq);
                        q.push(", last_hash = ");
                        q.push_bind(prev.clone());
                        q.push(" WHERE id = 1 RETURNING 1) ");
                    }
                    q.push(concat!("INSERT INTO audit_log (", audit_cols!(), ") "));
                    q.push_values(chunk.iter().zip(texts), |mut b, (e, text)| {
                        b.push_bind(e.seq)
                            .push_bind(ts(e.at))
                            .push_bind(e.request_id)
                            .push_bind(&e.actor)
                            .push_bind(&e.event)
                            .push_bind(text)
                            .push_bind(&e.prev_hash)
                            .push_bind(&e.hash);
                    });
                    // Unnamed above a few rows: the text varies with the row count, and a
                    // cached statement for every count would churn the connection's cache
                    // (each eviction one more round trip) and hold memory on both sides.
                    q.build()
                        .persistent(chunk.len() <= PREPARED_ROWS)
                        .execute(&mut **tx)
                        .await
                        .map_err(db_err)?;
                }
                if head_pending {
                    sqlx::query("UPDATE audit_head SET last_seq = $1, last_hash = $2 WHERE id = 1")
                        .bind(seq)
                        .bind(&prev)
                        .execute(&mut **tx)
                        .await
                        .map_err(db_err)?;
                }
                Ok(out)
            }

            /// The audit chain's head (last seq, last hash), locked until `tx` ends.
            async fn lock_audit_head(
                tx: &mut sqlx::Transaction<'static, $Db>,
            ) -> Result<(i64, String), StoreError> {
                let head = sqlx::query(concat!(
                    "SELECT last_seq, last_hash FROM audit_head WHERE id = 1",
                    $for_update
                ))
                .fetch_optional(&mut **tx)
                .await
                .map_err(db_err)?
                .ok_or_else(|| StoreError::Corrupt("the audit head row is missing".into()))?;
                Ok((col(&head, "last_seq")?, col(&head, "last_hash")?))
            }

            /// A conditional step change on `conn` (alone, or inside a group's transaction):
            /// the outer error is the database's, the inner one this change's own outcome
            /// (changed meanwhile, unknown).
            async fn update_step_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                task_id: Uuid,
                from: &[StepStatus],
                to: StepStatus,
                patch: &StepPatch,
            ) -> Result<Result<Step, StoreError>, StoreError> {
                let mut one = self.update_steps_in(conn, &[(task_id, from, to, patch)]).await?;
                Ok(one.pop().unwrap_or_else(|| Err(step_conflict(task_id, None))))
            }

            /// Conditional step changes `(step, from, to, patch)` in one statement, each with
            /// its own outcome (see [`Self::update_step_in`]). At most one change per step.
            async fn update_steps_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                rows: &[(Uuid, &[StepStatus], StepStatus, &StepPatch)],
            ) -> Result<Vec<Result<Step, StoreError>>, StoreError> {
                let lists = rows
                    .iter()
                    .map(|r| status_list(r.1))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut q = QueryBuilder::<$Db>::new(
                    "WITH v(v_tid, v_from, v_to, v_attempt, v_agent, v_queue, v_progress, \
                     v_output, v_diff, v_changed, v_error, v_ready, v_dispatched, v_deadline, \
                     v_finished, v_not_before, v_by) AS (",
                );
                q.push_values(rows.iter().zip(lists), |mut b, ((task, _, to, patch), list)| {
                    // A step that becomes ready joins the dispatch queue now unless told
                    // otherwise.
                    let ready_at = patch
                        .ready_at
                        .or_else(|| (*to == StepStatus::Ready).then(Utc::now));
                    b.push_bind(*task)
                        .push_bind(list)
                        .push_bind(to.as_str())
                        .push_bind(patch.attempt.map(i64::from))
                        .push_bind(&patch.agent_id)
                        .push_bind(&patch.queue)
                        .push_bind(patch.progress.map(i64::from))
                        .push_bind(&patch.output)
                        .push_bind(&patch.diff)
                        .push_bind(patch.changed)
                        .push_bind(patch.error.as_ref().map(Json))
                        .push_bind(ready_at.map(|t| ts(trunc(t))))
                        .push_bind(patch.dispatched_at.map(|t| ts(trunc(t))))
                        .push_bind(patch.deadline_at.map(|t| ts(trunc(t))))
                        .push_bind(patch.finished_at.map(|t| ts(trunc(t))))
                        .push_bind(patch.not_before.map(|t| ts(trunc(t))))
                        .push_bind(&patch.reported_by);
                });
                // A result binds the attempt to its reporter (`v_by`) unless it is bound to
                // another.
                q.push(concat!(
                    ") UPDATE plan_steps SET status = v_to, attempt = COALESCE(v_attempt, attempt), \
                     agent_id = COALESCE(v_agent, agent_id), queue = COALESCE(v_queue, queue), \
                     progress = COALESCE(v_progress, progress), output = COALESCE(v_output, output), \
                     diff = COALESCE(v_diff, diff), changed = COALESCE(v_changed, changed), \
                     error = COALESCE(v_error, error), ready_at = COALESCE(v_ready, ready_at), \
                     dispatched_at = COALESCE(v_dispatched, dispatched_at), \
                     deadline_at = COALESCE(v_deadline, deadline_at), \
                     finished_at = COALESCE(v_finished, finished_at), \
                     not_before = COALESCE(v_not_before, not_before), claimed_by = NULL, \
                     claim_until = NULL, \
                     broker_user = CASE WHEN v_by IS NULL THEN broker_user ELSE v_by END, \
                     broker_attempt = CASE WHEN v_by IS NULL THEN broker_attempt \
                     ELSE COALESCE(v_attempt, attempt) END \
                     FROM v WHERE task_id = v_tid AND (v_by IS NULL OR broker_attempt IS NULL \
                     OR broker_attempt <> COALESCE(v_attempt, attempt) OR broker_user = v_by) \
                     AND status ",
                    $one_of_v,
                    " RETURNING ",
                    step_cols!()
                ));
                let mut changed = keyed(q, conn, rows.len(), "task_id", step_from_row).await?;
                let mut out = Vec::with_capacity(rows.len());
                for (task, ..) in rows {
                    out.push(match changed.remove(task) {
                        Some(slot) => slot,
                        None => {
                            let current: Option<String> = sqlx::query_scalar(
                                "SELECT status FROM plan_steps WHERE task_id = $1",
                            )
                            .bind(*task)
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(db_err)?;
                            Err(step_conflict(*task, current))
                        }
                    });
                }
                Ok(out)
            }

            /// Inserts log lines on `conn`, in chunks of [`INSERT_CHUNK`] rows.
            async fn append_logs_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                lines: &[NewLogLine],
            ) -> Result<(), StoreError> {
                for chunk in lines.chunks(INSERT_CHUNK) {
                    let mut q = QueryBuilder::<$Db>::new(
                        "INSERT INTO execution_logs (request_id, task_id, at, kind, progress, message) ",
                    );
                    q.push_values(chunk, |mut b, l| {
                        b.push_bind(l.request_id)
                            .push_bind(l.task_id)
                            .push_bind(ts(trunc(l.at)))
                            .push_bind(&l.kind)
                            .push_bind(l.progress.map(i64::from))
                            .push_bind(&l.message);
                    });
                    // Unnamed above a few rows (see `append_audit_in`).
                    q.build()
                        .persistent(chunk.len() <= PREPARED_ROWS)
                        .execute(&mut *conn)
                        .await
                        .map_err(db_err)?;
                }
                Ok(())
            }

            /// One new request on `conn` (alone, or inside a group's transaction): a
            /// duplicate id is its own outcome (nothing inserted, a group goes on), not the
            /// database's error.
            async fn create_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                req: &NewRequest,
                audit_seq: Option<i64>,
                claim: Option<(&str, Duration)>,
            ) -> Result<Result<Request, StoreError>, StoreError> {
                let mut one = self.create_many_in(conn, &[(req, audit_seq, claim)]).await?;
                Ok(one.pop().unwrap_or_else(|| Err(StoreError::Corrupt("a request without its outcome".into()))))
            }

            /// New requests `(request, newest entry, planning claim)` in one insert, each
            /// with its own outcome (see [`Self::create_in`]). Ids are distinct.
            async fn create_many_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                rows: &[(&NewRequest, Option<i64>, Option<(&str, Duration)>)],
            ) -> Result<Vec<Result<Request, StoreError>>, StoreError> {
                let at = now();
                let mut q = QueryBuilder::<$Db>::new(
                    "INSERT INTO tasks (id, trace_id, text, requester, dry_run, status, \
                     created_at, updated_at, submitted_by, audit_seq, planning_owner, \
                     planning_until) ",
                );
                q.push_values(rows, |mut b, (req, seq, claim)| {
                    let until = claim.map(|(_, lease)| {
                        ts(trunc(
                            at + chrono::TimeDelta::from_std(lease)
                                .unwrap_or(chrono::TimeDelta::MAX),
                        ))
                    });
                    b.push_bind(req.id)
                        .push_bind(&req.trace_id)
                        .push_bind(&req.text)
                        .push_bind(&req.requester)
                        .push_bind(req.dry_run)
                        .push("'planning'")
                        .push_bind(ts(at))
                        .push_bind(ts(at))
                        .push_bind(&req.submitted_by)
                        .push_bind(*seq)
                        .push_bind(claim.map(|(owner, _)| owner))
                        .push_bind(until);
                });
                q.push(concat!(" ON CONFLICT (id) DO NOTHING RETURNING ", req_cols!()));
                let mut made = keyed(q, conn, rows.len(), "id", request_from_row).await?;
                Ok(rows
                    .iter()
                    .map(|(req, ..)| {
                        made.remove(&req.id).unwrap_or_else(|| {
                            Err(StoreError::Conflict {
                                message: format!("request {} already exists", req.id),
                                current: None,
                            })
                        })
                    })
                    .collect())
            }

            /// [`Requests::commit_group`] (non-empty `writes`) for the group at its place in
            /// `line`, its rows naming entry positions from the base it began with
            /// ([`HeadCache`]). Returns the outcomes, and where the chain's head was left
            /// (when the group locked it).
            async fn commit_group_with(
                &self,
                writes: &[GroupWrite],
                line: &InLine,
            ) -> Result<(Vec<Result<Written, StoreError>>, Option<i64>), StoreError> {
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                let mut g = Applied::new(line.begun.0, writes);
                // Independent writes in waves, each wave one statement per kind
                // ([`super::waves`]).
                for wave in super::waves::plan(writes, &g.riders) {
                    for (kind, idx) in wave {
                        for idx in idx.chunks(BATCH_ROWS) {
                            self.apply_batch(&mut tx, writes, kind, idx, &mut g).await?;
                        }
                    }
                }
                if g.entries.is_empty() {
                    line.pass();
                    tx.commit().await.map_err(db_err)?;
                    return Ok((g.finish(), None));
                }
                // The chain's head, locked last: the group's other changes are made, so
                // holding it takes no other lock (no deadlock through it), and a group
                // running beside this one waits for it only here. Each request changed
                // names its newest entry (`audit_seq`) in the same transaction that changes
                // it, and verify finds that entry gone if the log is cut back.
                line.wait_turn().await;
                let head = Self::lock_audit_head(&mut tx).await?;
                line.pass();
                // Rows that did not apply moved later entries up the chain, and the head may
                // not be where the rows assumed: those requests are corrected.
                let fix = g.fixes(head.0);
                for chunk in fix.chunks(BATCH_ROWS) {
                    let mut q = QueryBuilder::<$Db>::new("WITH v(v_id, v_seq) AS (");
                    q.push_values(chunk, |mut b, (id, seq)| {
                        b.push_bind(*id).push_bind(*seq);
                    });
                    q.push(") UPDATE tasks SET audit_seq = v_seq FROM v WHERE id = v_id");
                    q.build().persistent(false).execute(&mut *tx).await.map_err(db_err)?;
                }
                let first = head.0 + 1;
                let written = self.append_audit_in(&mut tx, &g.entries, Some(head)).await?;
                if written.first().map(|e| e.seq) != Some(first) {
                    return Err(head_moved());
                }
                let moved = written.last().map(|e| e.seq);
                tx.commit().await.map_err(db_err)?;
                Ok((g.finish(), moved))
            }

            /// Stores the steps of plans (`(request, plan, first step ready)`) in multi-row
            /// inserts: the first step of a request `ready` if told so, the others `pending`.
            async fn insert_steps_in(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                plans: &[(Uuid, &Plan, bool, Option<Uuid>)],
            ) -> Result<(), StoreError> {
                let ready_at = ts(now());
                let rows: Vec<(Uuid, usize, &PlanStep, bool, Uuid)> = plans
                    .iter()
                    .flat_map(|(id, plan, ready_now, first)| {
                        plan.steps.iter().enumerate().map(move |(seq, s)| {
                            let task = match (seq, first) {
                                (0, Some(first)) => *first,
                                _ => Uuid::now_v7(),
                            };
                            (*id, seq, s, *ready_now && seq == 0, task)
                        })
                    })
                    .collect();
                for chunk in rows.chunks(INSERT_CHUNK) {
                    let mut q = QueryBuilder::<$Db>::new(
                        "INSERT INTO plan_steps (task_id, request_id, seq, action, parameters, \
                         agent_type, resources, status, ready_at) ",
                    );
                    q.push_values(chunk, |mut b, (id, seq, s, ready, task)| {
                        b.push_bind(*task)
                            .push_bind(*id)
                            .push_bind(*seq as i64)
                            .push_bind(&s.action)
                            .push_bind(Json(&s.parameters))
                            .push_bind(&s.agent_type)
                            .push_bind(Json(&s.resources))
                            .push_bind(if *ready {
                                StepStatus::Ready.as_str()
                            } else {
                                StepStatus::Pending.as_str()
                            })
                            .push_bind(ready.then(|| ready_at.clone()));
                    });
                    q.build()
                        .persistent(plans.len() == 1)
                        .execute(&mut **tx)
                        .await
                        .map_err(|e| match db_err(e) {
                            StoreError::Conflict { current, .. } => StoreError::Conflict {
                                message: match plans {
                                    [(id, ..)] => format!("request {id} already has steps"),
                                    _ => "a request already has steps".into(),
                                },
                                current,
                            },
                            e => e,
                        })?;
                }
                Ok(())
            }

            /// Approved requests: the first step of each joins the dispatch queue.
            async fn ready_first_in(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                ids: &[Uuid],
            ) -> Result<(), StoreError> {
                for chunk in ids.chunks(BATCH_ROWS) {
                    let mut q = QueryBuilder::<$Db>::new(
                        "UPDATE plan_steps SET status = 'ready', ready_at = ",
                    );
                    q.push_bind(ts(now()));
                    q.push(
                        " WHERE status = 'pending' AND seq = (SELECT MIN(p.seq) FROM plan_steps p \
                         WHERE p.request_id = plan_steps.request_id) AND request_id IN ",
                    );
                    push_ids(&mut q, chunk);
                    q.build()
                        .persistent(chunk.len() == 1)
                        .execute(&mut **tx)
                        .await
                        .map_err(db_err)?;
                }
                Ok(())
            }

            /// One batch of a group's wave ([`super::waves`]): writes `idx`, all of `kind`, in
            /// as few statements as the kind allows (one statement whatever the row count for
            /// most kinds; planning claims and previews one by one).
            async fn apply_batch(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                kind: super::waves::Kind,
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                use super::waves::Kind;
                match kind {
                    Kind::Create => self.apply_creates(tx, writes, idx, g).await,
                    Kind::Transition => self.apply_transitions(tx, writes, idx, g).await,
                    Kind::Step => self.apply_steps(tx, writes, idx, g).await,
                    Kind::Send => self.apply_sends(tx, writes, idx, g).await,
                    Kind::Advance => self.apply_advances(tx, writes, idx, g).await,
                    Kind::Commit => self.apply_commits(tx, writes, idx, g).await,
                    Kind::Claim | Kind::Preview | Kind::Logs | Kind::Sent | Kind::Audit => {
                        let mut lines: Vec<NewLogLine> = Vec::new();
                        let mut sent: Vec<Uuid> = Vec::new();
                        for &i in idx {
                            match &writes[i] {
                                GroupWrite::ClaimPlanning { id, owner, lease } => {
                                    let claimed =
                                        self.claim_planning_in(&mut **tx, *id, owner, *lease).await?;
                                    let slot = if claimed {
                                        Ok(Written::Appended)
                                    } else {
                                        Err(claim_conflict(*id))
                                    };
                                    g.settle(i, slot, &[], None);
                                }
                                GroupWrite::Preview {
                                    task_id,
                                    preview,
                                    start,
                                    audit,
                                } => {
                                    let applied = self
                                        .write_preview_in(&mut **tx, *task_id, preview, *start)
                                        .await?;
                                    let slot = if applied {
                                        Ok(Written::Appended)
                                    } else {
                                        Err(StoreError::Conflict {
                                            message: if *start {
                                                format!("step {task_id} is unknown")
                                            } else {
                                                format!("the preview of step {task_id} is not pending")
                                            },
                                            current: None,
                                        })
                                    };
                                    g.settle(i, slot, audit, None);
                                }
                                GroupWrite::Logs(l) => {
                                    lines.extend(l.iter().cloned());
                                    g.settle(i, Ok(Written::Appended), &[], None);
                                }
                                GroupWrite::Sent(ids) => {
                                    sent.extend(ids.iter().copied());
                                    g.settle(i, Ok(Written::Appended), &[], None);
                                }
                                GroupWrite::Audit(e) => g.settle(i, Ok(Written::Appended), e, None),
                                _ => return Err(misplaced()),
                            }
                        }
                        self.append_logs_in(&mut **tx, &lines).await?;
                        for chunk in sent.chunks(INSERT_CHUNK) {
                            let mut q = QueryBuilder::<$Db>::new("DELETE FROM outbox WHERE id IN ");
                            push_ids(&mut q, chunk);
                            q.build()
                                .persistent(chunk.len() <= PREPARED_ROWS)
                                .execute(&mut **tx)
                                .await
                                .map_err(db_err)?;
                        }
                        Ok(())
                    }
                }
            }

            /// New requests (with the planning claims they are born with) in one insert.
            async fn apply_creates(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                let rows = batch_rows(writes, idx, |i, w| {
                    let GroupWrite::Create { request, audit } = w else {
                        return None;
                    };
                    let claim = match writes.get(i + 1) {
                        Some(GroupWrite::ClaimPlanning { owner, lease, .. })
                            if super::waves::born_claim(writes, i + 1) =>
                        {
                            Some((owner.as_str(), *lease))
                        }
                        _ => None,
                    };
                    Some((i, &**request, audit.as_slice(), claim))
                })?;
                let seqs = g.assume(&rows.iter().map(|r| r.2).collect::<Vec<_>>());
                let many: Vec<_> = rows
                    .iter()
                    .zip(&seqs)
                    .map(|((_, req, _, claim), seq)| (*req, *seq, *claim))
                    .collect();
                let made = self.create_many_in(&mut **tx, &many).await?;
                for ((i, req, audit, claim), (slot, seq)) in rows.iter().zip(made.into_iter().zip(seqs)) {
                    let created = slot.is_ok();
                    g.settle(*i, slot.map(Written::Request), audit, Some((req.id, seq)));
                    if claim.is_some() {
                        let slot = if created {
                            Ok(Written::Appended)
                        } else {
                            Err(claim_conflict(req.id))
                        };
                        g.settle(i + 1, slot, &[], None);
                    }
                }
                Ok(())
            }

            /// Conditional request status changes in one update, then their plans' steps
            /// and their first steps made ready.
            async fn apply_transitions(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                // Each with the move to `running` that rides with it, if one does: the row
                // is then written `running` once ([`Applied::riders`]).
                let rows = batch_rows(writes, idx, |i, w| match w {
                    GroupWrite::Transition { id, from, to, patch } => {
                        Some((i, *id, *from, *to, &**patch, g.riders.get(&i).copied()))
                    }
                    _ => None,
                })?;
                let mut legal = Vec::with_capacity(rows.len());
                for (i, id, from, to, patch, rider) in rows {
                    if from.can_transition_to(to) {
                        legal.push((i, id, from, to, patch, rider));
                    } else {
                        if let Some(j) = rider {
                            let not_queued = StoreError::Conflict {
                                message: format!("request {id} was not queued"),
                                current: None,
                            };
                            g.settle(j, Err(not_queued), &[], None);
                        }
                        let illegal = StoreError::Conflict {
                            message: format!("illegal transition from {from} to {to}"),
                            current: None,
                        };
                        g.settle(i, Err(illegal), &[], None);
                    }
                }
                let seqs = g.assume(&legal.iter().map(|t| t.4.audit.as_slice()).collect::<Vec<_>>());
                if legal.is_empty() {
                    return Ok(());
                }
                let mut q = QueryBuilder::<$Db>::new(
                    "WITH v(v_id, v_from, v_to, v_plan, v_approver, v_comment, v_error, v_commit, \
                     v_seq) AS (",
                );
                q.push_values(legal.iter().zip(&seqs), |mut b, ((_, id, from, to, patch, rider), seq)| {
                    let stored_as = if rider.is_some() { RequestStatus::Running } else { *to };
                    b.push_bind(*id)
                        .push_bind(from.as_str())
                        .push_bind(stored_as.as_str())
                        .push_bind(patch.plan.as_ref().map(Json))
                        .push_bind(&patch.approver)
                        .push_bind(&patch.approval_comment)
                        .push_bind(patch.error.as_ref().map(Json))
                        .push_bind(&patch.commit_id)
                        .push_bind(*seq);
                });
                q.push(") UPDATE tasks SET status = v_to, updated_at = ");
                q.push_bind(ts(now()));
                q.push(concat!(
                    ", plan = COALESCE(v_plan, plan), approver = COALESCE(v_approver, approver), \
                     approval_comment = COALESCE(v_comment, approval_comment), \
                     error = COALESCE(v_error, error), commit_id = COALESCE(v_commit, commit_id), \
                     audit_seq = COALESCE(v_seq, audit_seq) \
                     FROM v WHERE id = v_id AND status = v_from RETURNING ",
                    req_cols!()
                ));
                let mut changed = keyed(q, &mut **tx, legal.len(), "id", request_from_row).await?;
                let mut plans = Vec::new();
                let mut approved = Vec::new();
                let mut slots = Vec::with_capacity(legal.len());
                for (_, id, from, to, patch, rider) in &legal {
                    let slot = match changed.remove(id) {
                        Some(slot) => slot,
                        None => {
                            let current: Option<String> =
                                sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                                    .bind(*id)
                                    .fetch_optional(&mut **tx)
                                    .await
                                    .map_err(db_err)?;
                            if let Some(j) = *rider {
                                let not_queued = why_not(*id, RequestStatus::Queued, current.clone());
                                g.settle(j, Err(not_queued), &[], None);
                            }
                            Err(why_not(*id, *from, current))
                        }
                    };
                    // The row was written `running`: the plan's own write answers the request
                    // as it was queued, the move to `running` as it is now.
                    let slot = match (slot, *rider) {
                        (Ok(running), Some(j)) => {
                            let mut queued = running.clone();
                            queued.status = *to;
                            g.settle(j, Ok(Written::Request(running)), &[], None);
                            Ok(queued)
                        }
                        (slot, _) => slot,
                    };
                    if slot.is_ok() {
                        let ready_now = *to == RequestStatus::Queued;
                        match &patch.plan {
                            Some(plan) => plans.push((*id, plan, ready_now, patch.first_step_id)),
                            None if ready_now => approved.push(*id),
                            None => {}
                        }
                    }
                    slots.push(slot);
                }
                self.insert_steps_in(tx, &plans).await?;
                self.ready_first_in(tx, &approved).await?;
                for ((i, id, _, _, patch, _), (slot, seq)) in legal.iter().zip(slots.into_iter().zip(seqs)) {
                    g.settle(*i, slot.map(Written::Request), &patch.audit, Some((*id, seq)));
                }
                Ok(())
            }

            /// Conditional step changes in one update, then the log lines of those that
            /// applied.
            async fn apply_steps(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                let rows = batch_rows(writes, idx, |i, w| match w {
                    GroupWrite::Step { task_id, from, to, patch, logs, audit } => {
                        Some((i, *task_id, from.as_slice(), *to, &**patch, logs, audit))
                    }
                    _ => None,
                })?;
                let many: Vec<_> = rows
                    .iter()
                    .map(|(_, task, from, to, patch, ..)| (*task, *from, *to, *patch))
                    .collect();
                let changed = self.update_steps_in(&mut **tx, &many).await?;
                let lines: Vec<NewLogLine> = rows
                    .iter()
                    .zip(&changed)
                    .filter(|(_, slot)| slot.is_ok())
                    .flat_map(|(r, _)| r.5.iter().cloned())
                    .collect();
                self.append_logs_in(&mut **tx, &lines).await?;
                for ((i, _, _, _, _, _, audit), slot) in rows.iter().zip(changed) {
                    g.settle(*i, slot.map(Written::Step), audit, None);
                }
                Ok(())
            }

            /// Work messages into the outbox, each only if its step is dispatched with its
            /// attempt.
            async fn apply_sends(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                let msgs = batch_rows(writes, idx, |i, w| match w {
                    GroupWrite::Send(m) => Some((i, m)),
                    _ => None,
                })?;
                let mut q = QueryBuilder::<$Db>::new(
                    "WITH v(v_id, v_tid, v_attempt, v_queue, v_body, v_at) AS (",
                );
                q.push_values(&msgs, |mut b, (_, m)| {
                    b.push_bind(m.id)
                        .push_bind(m.task_id)
                        .push_bind(i64::from(m.attempt))
                        .push_bind(&m.queue)
                        .push_bind(&m.body)
                        .push_bind(ts(trunc(m.created_at)));
                });
                q.push(
                    ") INSERT INTO outbox (id, task_id, attempt, queue, body, created_at) \
                     SELECT v_id, v_tid, v_attempt, v_queue, v_body, v_at FROM v \
                     WHERE EXISTS (SELECT 1 FROM plan_steps WHERE task_id = v_tid \
                     AND status = 'dispatched' AND attempt = v_attempt) RETURNING id",
                );
                let stored = keyed(q, &mut **tx, msgs.len(), "id", |_| Ok(())).await?;
                for (i, m) in msgs {
                    let slot = if stored.contains_key(&m.id) {
                        Ok(Written::Appended)
                    } else {
                        Err(StoreError::Conflict {
                            message: format!(
                                "step {} is not dispatched with attempt {}",
                                m.task_id, m.attempt
                            ),
                            current: None,
                        })
                    };
                    g.settle(i, slot, &[], None);
                }
                Ok(())
            }

            /// After completed steps: each request's next step made ready, or, for those
            /// with none left, the request completed with its entries.
            async fn apply_advances(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                let rows = batch_rows(writes, idx, |i, w| match w {
                    GroupWrite::Advance { request_id, after_seq, audit } => {
                        Some((i, *request_id, i64::from(*after_seq), audit.as_slice()))
                    }
                    _ => None,
                })?;
                let now = ts(now());
                let mut q = QueryBuilder::<$Db>::new("WITH v(v_rid, v_after) AS (");
                q.push_values(&rows, |mut b, (_, id, after, _)| {
                    b.push_bind(*id).push_bind(*after);
                });
                q.push(") UPDATE plan_steps SET status = 'ready', ready_at = ");
                q.push_bind(now.clone());
                q.push(
                    " FROM v WHERE request_id = v_rid AND seq = v_after + 1 AND status = 'pending' \
                     AND EXISTS (SELECT 1 FROM plan_steps p WHERE p.request_id = v_rid \
                     AND p.seq = v_after AND p.status = 'completed') RETURNING request_id",
                );
                let advanced = keyed(q, &mut **tx, rows.len(), "request_id", |_| Ok(())).await?;
                let mut rest = Vec::with_capacity(rows.len());
                for row in rows {
                    if advanced.contains_key(&row.1) {
                        g.settle(row.0, Ok(Written::Advanced(None)), &[], None);
                    } else {
                        rest.push(row);
                    }
                }
                if rest.is_empty() {
                    return Ok(());
                }
                // None left to run: the request completes.
                let seqs = g.assume(&rest.iter().map(|r| r.3).collect::<Vec<_>>());
                let mut q = QueryBuilder::<$Db>::new("WITH v(v_id, v_seq) AS (");
                q.push_values(rest.iter().zip(&seqs), |mut b, ((_, id, _, _), seq)| {
                    b.push_bind(*id).push_bind(*seq);
                });
                q.push(") UPDATE tasks SET status = 'completed', updated_at = ");
                q.push_bind(now);
                q.push(concat!(
                    ", audit_seq = COALESCE(v_seq, audit_seq) FROM v \
                     WHERE id = v_id AND status IN ('queued', 'running') \
                     AND NOT EXISTS (SELECT 1 FROM plan_steps WHERE request_id = v_id \
                     AND status NOT IN ('completed', 'skipped')) RETURNING ",
                    req_cols!()
                ));
                let mut done = keyed(q, &mut **tx, rest.len(), "id", request_from_row).await?;
                for ((i, id, _, audit), seq) in rest.into_iter().zip(seqs) {
                    let slot = match done.remove(&id) {
                        Some(r) => r.map(|r| Written::Advanced(Some(r))),
                        None => Ok(Written::Advanced(None)),
                    };
                    // Only a request completed here appends its entries.
                    let audit = match slot {
                        Ok(Written::Advanced(Some(_))) => audit,
                        _ => &[],
                    };
                    g.settle(i, slot, audit, Some((id, seq)));
                }
                Ok(())
            }

            /// The git trail's outcomes for ended requests, each stored once.
            async fn apply_commits(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                writes: &[GroupWrite],
                idx: &[usize],
                g: &mut Applied,
            ) -> Result<(), StoreError> {
                let rows = batch_rows(writes, idx, |i, w| {
                    let GroupWrite::Commit { id, commit, audit } = w else {
                        return None;
                    };
                    let (commit_id, failed) = match commit {
                        Ok(c) => (Some(c.as_str()), None),
                        Err(e) => (None, Some(e.as_str())),
                    };
                    Some((i, *id, commit_id, failed, audit.as_slice()))
                })?;
                let seqs = g.assume(&rows.iter().map(|r| r.4).collect::<Vec<_>>());
                let mut q = QueryBuilder::<$Db>::new("WITH v(v_id, v_commit, v_failed, v_seq) AS (");
                q.push_values(rows.iter().zip(&seqs), |mut b, ((_, id, commit, failed, _), seq)| {
                    b.push_bind(*id).push_bind(*commit).push_bind(*failed).push_bind(*seq);
                });
                q.push(concat!(
                    ") UPDATE tasks SET commit_id = v_commit, commit_error = v_failed, \
                     audit_seq = COALESCE(v_seq, audit_seq) FROM v \
                     WHERE id = v_id AND commit_id IS NULL AND commit_error IS NULL RETURNING ",
                    req_cols!()
                ));
                let mut done = keyed(q, &mut **tx, rows.len(), "id", request_from_row).await?;
                for ((i, id, _, _, audit), seq) in rows.into_iter().zip(seqs) {
                    let slot = done.remove(&id).unwrap_or_else(|| {
                        Err(StoreError::Conflict {
                            message: format!(
                                "request {id} is unknown or its git record is already stored"
                            ),
                            current: None,
                        })
                    });
                    g.settle(i, slot.map(Written::Request), audit, Some((id, seq)));
                }
                Ok(())
            }

            /// Writes a step's preview on `conn`. `start`: records it (replacing any earlier
            /// one); false if the step is unknown. Otherwise stores its outcome, only while
            /// that preview is pending; false if it is not.
            async fn write_preview_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                task_id: Uuid,
                preview: &StepPreview,
                start: bool,
            ) -> Result<bool, StoreError> {
                let sql = if start {
                    "UPDATE plan_steps SET preview_task_id = $2, preview_status = $3, preview = $4 \
                     WHERE task_id = $1"
                } else {
                    "UPDATE plan_steps SET preview_status = $3, preview = $4 \
                     WHERE task_id = $1 AND preview_task_id = $2 AND preview_status = 'pending'"
                };
                let done = sqlx::query(sql)
                    .bind(task_id)
                    .bind(preview.task_id)
                    .bind(preview_status_str(preview.status))
                    .bind(Json(preview))
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
                Ok(done.rows_affected() == 1)
            }

            /// [`Requests::claim_planning`] on `conn` (alone, or inside a group's
            /// transaction).
            async fn claim_planning_in(
                &self,
                conn: &mut <$Db as sqlx::Database>::Connection,
                id: Uuid,
                owner: &str,
                lease: Duration,
            ) -> Result<bool, StoreError> {
                let now = chrono::Utc::now();
                let until = ts(trunc(
                    now + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX),
                ));
                let now = ts(trunc(now));
                let done = sqlx::query(
                    "UPDATE tasks SET planning_owner = $2, planning_until = $3 \
                     WHERE id = $1 AND status = 'planning' \
                     AND (planning_until IS NULL OR planning_until < $4 OR planning_owner = $2)",
                )
                .bind(id)
                .bind(owner)
                .bind(until)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn step_status(&self, task_id: Uuid) -> Result<Option<String>, StoreError> {
                sqlx::query_scalar("SELECT status FROM plan_steps WHERE task_id = $1")
                    .bind(task_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err)
            }
        }

        fn col<'r, T>(row: &'r $Row, name: &str) -> Result<T, StoreError>
        where
            T: sqlx::Decode<'r, $Db> + sqlx::Type<$Db>,
        {
            row.try_get(name).map_err(|e| corrupt(name, e))
        }

        /// Pushes `(id, id, …)` onto `q`, each id bound.
        fn push_ids(q: &mut QueryBuilder<$Db>, ids: &[Uuid]) {
            q.push("(");
            let mut each = q.separated(", ");
            for id in ids {
                each.push_bind(*id);
            }
            q.push(")");
        }

        /// Runs `q` (`rows` rows of input) and keys what it returns by its `key` column,
        /// each row converted by `conv`. One row keeps a cached prepared statement; more are
        /// unnamed statements (their row count varies, and would churn the cache).
        async fn keyed<T>(
            mut q: QueryBuilder<$Db>,
            conn: &mut <$Db as sqlx::Database>::Connection,
            rows: usize,
            key: &str,
            conv: fn(&$Row) -> Result<T, StoreError>,
        ) -> Result<std::collections::HashMap<Uuid, Result<T, StoreError>>, StoreError> {
            let mut out = std::collections::HashMap::with_capacity(rows);
            for row in q
                .build()
                .persistent(rows == 1)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err)?
            {
                out.insert(col::<Uuid>(&row, key)?, conv(&row));
            }
            Ok(out)
        }

        fn u32_col(row: &$Row, name: &str) -> Result<u32, StoreError> {
            u32::try_from(col::<i64>(row, name)?).map_err(|e| corrupt(name, e))
        }

        fn u64_col(row: &$Row, name: &str) -> Result<u64, StoreError> {
            u64::try_from(col::<i64>(row, name)?).map_err(|e| corrupt(name, e))
        }

        fn request_from_row(row: &$Row) -> Result<Request, StoreError> {
            let status: String = col(row, "status")?;
            Ok(Request {
                id: col(row, "id")?,
                trace_id: col(row, "trace_id")?,
                text: col(row, "text")?,
                requester: col(row, "requester")?,
                submitted_by: col::<Option<String>>(row, "submitted_by")?
                    .unwrap_or_else(|| col(row, "requester").unwrap_or_default()),
                dry_run: col(row, "dry_run")?,
                status: RequestStatus::parse(&status)
                    .ok_or_else(|| corrupt("tasks.status", format!("unknown status `{status}`")))?,
                plan: col::<Option<Json<Plan>>>(row, "plan")?.map(|j| j.0),
                approver: col(row, "approver")?,
                approval_comment: col(row, "approval_comment")?,
                error: col::<Option<Json<ErrorPayload>>>(row, "error")?.map(|j| j.0),
                commit_id: col(row, "commit_id")?,
                created_at: ts_col(row, "created_at")?,
                updated_at: ts_col(row, "updated_at")?,
            })
        }

        fn step_from_row(row: &$Row) -> Result<Step, StoreError> {
            let status: String = col(row, "status")?;
            Ok(Step {
                request_id: col(row, "request_id")?,
                seq: u32_col(row, "seq")?,
                task_id: col(row, "task_id")?,
                action: col(row, "action")?,
                parameters: col::<Json<serde_json::Map<String, serde_json::Value>>>(row, "parameters")?.0,
                agent_type: col(row, "agent_type")?,
                resources: col::<Json<Resources>>(row, "resources")?.0,
                status: StepStatus::parse(&status)
                    .ok_or_else(|| corrupt("plan_steps.status", format!("unknown status `{status}`")))?,
                attempt: u32_col(row, "attempt")?,
                agent_id: col(row, "agent_id")?,
                queue: col(row, "queue")?,
                broker_user: col(row, "broker_user")?,
                progress: u32_col(row, "progress")?,
                output: col(row, "output")?,
                diff: col(row, "diff")?,
                changed: col(row, "changed")?,
                error: col::<Option<Json<ErrorPayload>>>(row, "error")?.map(|j| j.0),
                ready_at: opt_ts_col(row, "ready_at")?,
                dispatched_at: opt_ts_col(row, "dispatched_at")?,
                deadline_at: opt_ts_col(row, "deadline_at")?,
                finished_at: opt_ts_col(row, "finished_at")?,
                not_before: opt_ts_col(row, "not_before")?,
                preview: col::<Option<Json<StepPreview>>>(row, "preview")?.map(|j| j.0),
            })
        }

        fn log_from_row(row: &$Row) -> Result<LogLine, StoreError> {
            Ok(LogLine {
                id: col(row, "id")?,
                line: NewLogLine {
                    request_id: col(row, "request_id")?,
                    task_id: col(row, "task_id")?,
                    at: ts_col(row, "at")?,
                    kind: col(row, "kind")?,
                    progress: col::<Option<i64>>(row, "progress")?
                        .map(u32::try_from)
                        .transpose()
                        .map_err(|e| corrupt("progress", e))?,
                    message: col(row, "message")?,
                },
            })
        }

        /// An audit row, and why it cannot verify when its details are not the JSON text the
        /// chain hashed (the row was altered; unparsable details are returned as a JSON string).
        fn audit_from_row(row: &$Row) -> Result<(AuditEntry, Option<String>), StoreError> {
            let seq: i64 = col(row, "seq")?;
            let text: String = col(row, "details")?;
            let (details, problem) = audit_details(seq, text);
            let entry = AuditEntry {
                seq,
                at: ts_col(row, "at")?,
                request_id: col(row, "request_id")?,
                actor: col(row, "actor")?,
                event: col(row, "event")?,
                details,
                prev_hash: col(row, "prev_hash")?,
                hash: col(row, "hash")?,
            };
            Ok((entry, problem))
        }

        #[async_trait]
        impl Requests for $Store {
            fn concurrent_groups(&self) -> usize {
                $concurrent_groups
            }

            async fn create_request(&self, req: &NewRequest) -> Result<Request, StoreError> {
                let mut conn = self.pool.acquire().await.map_err(db_err)?;
                self.create_in(&mut conn, req, None, None).await?
            }

            async fn get_request(&self, id: Uuid) -> Result<Request, StoreError> {
                let row = sqlx::query(concat!("SELECT ", req_cols!(), " FROM tasks WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err)?
                    .ok_or_else(|| StoreError::not_found(format!("request {id}")))?;
                request_from_row(&row)
            }

            async fn get_requests(&self, ids: &[Uuid]) -> Result<Vec<Request>, StoreError> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(INSERT_CHUNK) {
                    let mut q = QueryBuilder::<$Db>::new(concat!(
                        "SELECT ",
                        req_cols!(),
                        " FROM tasks WHERE id IN "
                    ));
                    push_ids(&mut q, chunk);
                    // Unnamed unless of one id: a plan made once for a list of ids, while the
                    // table is small, can settle on a sequential scan.
                    for row in q
                        .build()
                        .persistent(chunk.len() == 1)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db_err)?
                    {
                        out.push(request_from_row(&row)?);
                    }
                }
                Ok(out)
            }

            async fn list_requests(&self, filter: &RequestFilter) -> Result<Vec<Request>, StoreError> {
                let mut q = QueryBuilder::<$Db>::new(concat!(
                    "SELECT ",
                    req_cols!(),
                    " FROM tasks WHERE 1 = 1"
                ));
                if let Some(s) = filter.status {
                    q.push(" AND status = ").push_bind(s.as_str());
                }
                if let Some(before) = filter.updated_before {
                    q.push(" AND updated_at < ").push_bind(ts(trunc(before)));
                }
                if let Some(before) = filter.created_before {
                    q.push(" AND created_at < ").push_bind(ts(trunc(before)));
                }
                if let Some(prefix) = &filter.id_prefix {
                    match id_prefix_range(prefix) {
                        Some((low, high)) => {
                            q.push(" AND id BETWEEN ").push_bind(low);
                            q.push(" AND ").push_bind(high);
                        }
                        None => {
                            q.push(" AND 1 = 0");
                        }
                    }
                }
                q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
                    .push_bind(i64::from(filter.limit.unwrap_or(DEFAULT_LIST_LIMIT)));
                let rows = q.build().fetch_all(&self.pool).await.map_err(db_err)?;
                rows.iter().map(request_from_row).collect()
            }

            async fn transition(
                &self,
                id: Uuid,
                from: RequestStatus,
                to: RequestStatus,
                patch: &RequestPatch,
            ) -> Result<Request, StoreError> {
                // A group of one: the change, its steps and its entries in one transaction.
                let write = GroupWrite::Transition {
                    id,
                    from,
                    to,
                    patch: Box::new(patch.clone()),
                };
                let mut slots = self.commit_group(std::slice::from_ref(&write)).await?;
                match slots.pop() {
                    Some(Ok(Written::Request(req))) => Ok(req),
                    Some(Err(e)) => Err(e),
                    _ => Err(StoreError::Corrupt("a transition without its outcome".into())),
                }
            }

            async fn commit_group(
                &self,
                writes: &[GroupWrite],
            ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
                if writes.is_empty() {
                    return Ok(Vec::new());
                }
                let entries: usize = writes
                    .iter()
                    .filter_map(GroupWrite::audit)
                    .map(|a| a.len())
                    .sum();
                let mut line = InLine::begin(&self.head, &self.head_turn, entries);
                let out = self.commit_group_with(writes, &line).await;
                line.moved = out.as_ref().ok().and_then(|(_, moved)| *moved);
                drop(line);
                out.map(|(slots, _)| slots)
            }

            async fn set_commit_id(&self, id: Uuid, commit_id: &str) -> Result<(), StoreError> {
                let done =
                    sqlx::query("UPDATE tasks SET commit_id = $1 WHERE id = $2 AND commit_id IS NULL")
                        .bind(commit_id)
                        .bind(id)
                        .execute(&self.pool)
                        .await
                        .map_err(db_err)?;
                if done.rows_affected() == 0 {
                    // Either unknown, or already set (idempotent when it is the same commit).
                    let current: Option<Option<String>> =
                        sqlx::query_scalar("SELECT commit_id FROM tasks WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&self.pool)
                            .await
                            .map_err(db_err)?;
                    match current {
                        None => return Err(StoreError::not_found(format!("request {id}"))),
                        Some(Some(c)) if c != commit_id => {
                            return Err(StoreError::Conflict {
                                message: format!("request {id} already has commit {c}"),
                                current: Some(c),
                            })
                        }
                        _ => {}
                    }
                }
                Ok(())
            }

            async fn uncommitted(
                &self,
                ended_before: DateTime<Utc>,
                limit: u32,
            ) -> Result<Vec<Request>, StoreError> {
                // `tasks_commit_pending_idx` holds exactly these rows.
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    req_cols!(),
                    " FROM tasks WHERE commit_id IS NULL AND commit_error IS NULL \
                     AND approver IS NOT NULL AND status IN ('completed', 'failed', 'cancelled') \
                     AND updated_at < $1 ORDER BY updated_at LIMIT $2"
                ))
                .bind(ts(trunc(ended_before)))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(request_from_row).collect()
            }

            async fn request_counts(&self) -> Result<Vec<(RequestStatus, u64)>, StoreError> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT status, COUNT(*) FROM tasks GROUP BY status")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db_err)?;
                rows.into_iter()
                    .map(|(s, n)| {
                        RequestStatus::parse(&s)
                            .map(|st| (st, n.max(0) as u64))
                            .ok_or_else(|| StoreError::Corrupt(format!("unknown request status `{s}`")))
                    })
                    .collect()
            }

            async fn claim_planning(
                &self,
                id: Uuid,
                owner: &str,
                lease: Duration,
            ) -> Result<bool, StoreError> {
                let mut conn = self.pool.acquire().await.map_err(db_err)?;
                self.claim_planning_in(&mut conn, id, owner, lease).await
            }

            async fn planning_to_resume(
                &self,
                stale_unleased: DateTime<Utc>,
                limit: u32,
            ) -> Result<Vec<Request>, StoreError> {
                let now = ts(trunc(chrono::Utc::now()));
                let stale = ts(trunc(stale_unleased));
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    req_cols!(),
                    " FROM tasks WHERE status = 'planning' AND \
                     ((planning_until IS NOT NULL AND planning_until < $1) \
                      OR (planning_until IS NULL AND updated_at < $2)) \
                     ORDER BY created_at LIMIT $3"
                ))
                .bind(now)
                .bind(stale)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(request_from_row).collect()
            }
        }

        #[async_trait]
        impl Steps for $Store {
            async fn steps(&self, request_id: Uuid) -> Result<Vec<Step>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    step_cols!(),
                    " FROM plan_steps WHERE request_id = $1 ORDER BY seq"
                ))
                .bind(request_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                if rows.is_empty() {
                    // Tell "no plan yet" from "no such request".
                    self.get_request(request_id).await?;
                }
                rows.iter().map(step_from_row).collect()
            }

            async fn steps_of(
                &self,
                request_ids: &[Uuid],
            ) -> Result<std::collections::HashMap<Uuid, Vec<Step>>, StoreError> {
                let mut out: std::collections::HashMap<Uuid, Vec<Step>> =
                    std::collections::HashMap::with_capacity(request_ids.len());
                for chunk in request_ids.chunks(INSERT_CHUNK) {
                    let mut q = QueryBuilder::<$Db>::new(concat!(
                        "SELECT ",
                        step_cols!(),
                        " FROM plan_steps WHERE request_id IN "
                    ));
                    push_ids(&mut q, chunk);
                    q.push(" ORDER BY request_id, seq");
                    let rows = q
                        .build()
                        .persistent(chunk.len() == 1)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db_err)?;
                    for row in &rows {
                        let step = step_from_row(row)?;
                        out.entry(step.request_id).or_default().push(step);
                    }
                }
                Ok(out)
            }

            async fn get_step(&self, task_id: Uuid) -> Result<Step, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    step_cols!(),
                    " FROM plan_steps WHERE task_id = $1"
                ))
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?
                .ok_or_else(|| StoreError::not_found(format!("step {task_id}")))?;
                step_from_row(&row)
            }

            async fn update_step(
                &self,
                task_id: Uuid,
                from: &[StepStatus],
                to: StepStatus,
                patch: &StepPatch,
            ) -> Result<Step, StoreError> {
                let mut conn = self.pool.acquire().await.map_err(db_err)?;
                self.update_step_in(&mut conn, task_id, from, to, patch).await?
            }

            async fn outbox_due(
                &self,
                before: DateTime<Utc>,
                limit: u32,
            ) -> Result<Vec<OutboxMessage>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, task_id, attempt, queue, body, created_at FROM outbox \
                     WHERE created_at < $1 ORDER BY created_at LIMIT $2",
                )
                .bind(ts(trunc(before)))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|row| {
                        Ok(OutboxMessage {
                            id: col(row, "id")?,
                            task_id: col(row, "task_id")?,
                            attempt: u32_col(row, "attempt")?,
                            queue: col(row, "queue")?,
                            body: col(row, "body")?,
                            created_at: ts_col(row, "created_at")?,
                        })
                    })
                    .collect()
            }

            async fn claim_ready_steps(
                &self,
                owner: &str,
                limit: u32,
                lease: Duration,
            ) -> Result<Vec<Step>, StoreError> {
                if limit == 0 {
                    return Ok(Vec::new());
                }
                let now = now();
                let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                // One statement (atomic by itself; SKIP LOCKED keeps instances off each other's rows).
                let rows = sqlx::query(concat!(
                    "UPDATE plan_steps SET claimed_by = $1, claim_until = $2 WHERE task_id IN (\
                     SELECT task_id FROM plan_steps WHERE status = 'ready' \
                     AND (not_before IS NULL OR not_before <= $3) \
                     AND (claim_until IS NULL OR claim_until < $3) \
                     ORDER BY ready_at, seq LIMIT $4",
                    $skip_locked,
                    ") RETURNING ",
                    step_cols!()
                ))
                .bind(owner)
                .bind(ts(until))
                .bind(ts(now))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                let mut steps = rows
                    .iter()
                    .map(step_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                steps.sort_by_key(|s| (s.ready_at, s.seq));
                Ok(steps)
            }

            async fn release_step(&self, task_id: Uuid, owner: &str) -> Result<(), StoreError> {
                let done = sqlx::query(
                    "UPDATE plan_steps SET claimed_by = NULL, claim_until = NULL \
                     WHERE task_id = $1 AND claimed_by = $2",
                )
                .bind(task_id)
                .bind(owner)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                if done.rows_affected() == 1 {
                    return Ok(());
                }
                match self.step_status(task_id).await? {
                    None => Err(StoreError::not_found(format!("step {task_id}"))),
                    Some(s) => Err(StoreError::Conflict {
                        message: format!("step {task_id} is not claimed by {owner}"),
                        current: Some(s),
                    }),
                }
            }

            async fn bind_step_publisher(
                &self,
                task_id: Uuid,
                attempt: u32,
                broker_user: &str,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE plan_steps SET broker_user = $3, broker_attempt = $2 \
                     WHERE task_id = $1 AND attempt = $2 \
                     AND (broker_attempt IS NULL OR broker_attempt <> $2 OR broker_user = $3)",
                )
                .bind(task_id)
                .bind(i64::from(attempt))
                .bind(broker_user)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn start_step_preview(
                &self,
                task_id: Uuid,
                preview: &StepPreview,
            ) -> Result<(), StoreError> {
                let mut conn = self.pool.acquire().await.map_err(db_err)?;
                if !self.write_preview_in(&mut conn, task_id, preview, true).await? {
                    return Err(StoreError::not_found(format!("step {task_id}")));
                }
                Ok(())
            }

            async fn step_by_preview(&self, preview_task_id: Uuid) -> Result<Option<Step>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    step_cols!(),
                    " FROM plan_steps WHERE preview_task_id = $1"
                ))
                .bind(preview_task_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
                row.as_ref().map(step_from_row).transpose()
            }

            async fn finish_step_preview(
                &self,
                task_id: Uuid,
                preview: &StepPreview,
            ) -> Result<bool, StoreError> {
                let mut conn = self.pool.acquire().await.map_err(db_err)?;
                self.write_preview_in(&mut conn, task_id, preview, false).await
            }

            async fn overdue_steps(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Step>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    step_cols!(),
                    " FROM plan_steps WHERE status IN ('dispatched', 'running') AND deadline_at < $1 \
                     ORDER BY deadline_at LIMIT $2"
                ))
                .bind(ts(trunc(now)))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(step_from_row).collect()
            }
        }

        #[async_trait]
        impl Logs for $Store {
            async fn append_logs(&self, lines: &[NewLogLine]) -> Result<(), StoreError> {
                if lines.is_empty() {
                    return Ok(());
                }
                // One chunk is one statement, atomic by itself: a transaction only for several.
                let tx = if lines.len() > INSERT_CHUNK {
                    Some(self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?)
                } else {
                    None
                };
                match tx {
                    Some(mut tx) => {
                        self.append_logs_in(&mut tx, lines).await?;
                        tx.commit().await.map_err(db_err)
                    }
                    None => {
                        let mut conn = self.pool.acquire().await.map_err(db_err)?;
                        self.append_logs_in(&mut conn, lines).await
                    }
                }
            }

            async fn logs(
                &self,
                request_id: Uuid,
                after_id: Option<i64>,
                limit: u32,
            ) -> Result<Vec<LogLine>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, request_id, task_id, at, kind, progress, message FROM execution_logs \
                     WHERE request_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(request_id)
                .bind(after_id.unwrap_or(0))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter().map(log_from_row).collect()
            }
        }

        #[async_trait]
        impl Agents for $Store {
            async fn record_heartbeat(
                &self,
                hb: &Heartbeat,
                at: DateTime<Utc>,
                broker_user: Option<&str>,
            ) -> Result<(), StoreError> {
                let takeover_before = ts(trunc(at - AGENT_TAKEOVER_AFTER));
                let at = ts(trunc(at));
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                // The id belongs to the broker user that registered it: another user may take it over
                // only once the agent has been silent for AGENT_TAKEOVER_AFTER.
                let owner: Option<Option<String>> =
                    sqlx::query_scalar("SELECT broker_user FROM agents WHERE agent_id = $1")
                        .bind(&hb.agent_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_err)?;
                if let Some(Some(owner)) = &owner {
                    if Some(owner.as_str()) != broker_user {
                        let alive: Option<bool> =
                            sqlx::query_scalar("SELECT last_seen >= $2 FROM agents WHERE agent_id = $1")
                                .bind(&hb.agent_id)
                                .bind(takeover_before)
                                .fetch_optional(&mut *tx)
                                .await
                                .map_err(db_err)?;
                        if alive.unwrap_or(false) {
                            return Err(StoreError::Conflict {
                                message: format!(
                                    "agent {} is registered to another broker user",
                                    hb.agent_id
                                ),
                                current: None,
                            });
                        }
                    }
                }
                // A heartbeat that arrives late never replaces a newer one.
                sqlx::query(
                    "INSERT INTO agents (agent_id, agent_type, hostname, first_seen, last_seen, heartbeat, \
                     broker_user) \
                     VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (agent_id) DO UPDATE SET \
                     agent_type = excluded.agent_type, hostname = excluded.hostname, \
                     last_seen = excluded.last_seen, heartbeat = excluded.heartbeat, \
                     broker_user = excluded.broker_user \
                     WHERE excluded.last_seen >= agents.last_seen",
                )
                .bind(&hb.agent_id)
                .bind(&hb.agent_type)
                .bind(&hb.hostname)
                .bind(&at)
                .bind(Json(hb))
                .bind(broker_user)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                // The fleet's figures over time: a heartbeat that does not know its CPU or memory
                // (both optional in the protocol) adds no row; `agents` keeps it whole.
                if let (Some(cpu), Some(memory)) = (&hb.cpu, &hb.memory) {
                    sqlx::query(
                        "INSERT INTO resource_metrics (agent_id, at, cpu_percent, cpu_cores, load_1m, \
                         memory_used_gb, memory_total_gb, gpus, running_tasks) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(&hb.agent_id)
                    .bind(&at)
                    .bind(cpu.percent)
                    .bind(i64::from(cpu.cores))
                    .bind(cpu.load_1m)
                    .bind(memory.used_gb)
                    .bind(memory.total_gb)
                    .bind(Json(&hb.gpus))
                    .bind(i64::from(hb.running_tasks))
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                }
                tx.commit().await.map_err(db_err)
            }

            async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT agent_id, agent_type, hostname, last_seen, heartbeat, broker_user FROM agents \
                     ORDER BY agent_id",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(AgentRecord {
                            agent_id: col(r, "agent_id")?,
                            broker_user: col(r, "broker_user")?,
                            agent_type: col(r, "agent_type")?,
                            hostname: col(r, "hostname")?,
                            last_seen: ts_col(r, "last_seen")?,
                            heartbeat: col::<Json<Heartbeat>>(r, "heartbeat")?.0,
                        })
                    })
                    .collect()
            }
        }

        #[async_trait]
        impl BudgetLedger for $Store {
            async fn reserve_llm(&self, r: &LlmReservation) -> Result<Reservation, StoreError> {
                let at = now();
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                sqlx::query(
                    "INSERT INTO llm_budget (provider, month) VALUES ($1, $2) \
                     ON CONFLICT (provider, month) DO NOTHING",
                )
                .bind(&r.provider)
                .bind(&r.month)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                // The budget row's lock serialises the reservers of one provider and month (on
                // every instance); under READ COMMITTED the sum below, read after the lock, sees
                // every reservation committed before it.
                let spent: i64 = sqlx::query_scalar(
                    concat!(
                        "SELECT spent_micros FROM llm_budget WHERE provider = $1 AND month = $2",
                        $for_update
                    ),
                )
                .bind(&r.provider)
                .bind(&r.month)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
                let open: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(reserved_micros), 0) AS BIGINT) FROM llm_usage \
                     WHERE provider = $1 AND month = $2 AND status = 'reserved' AND expires_at > $3",
                )
                .bind(&r.provider)
                .bind(&r.month)
                .bind(ts(at))
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
                if !fits_budget(spent, open, r) {
                    return Ok(Reservation::OverBudget {
                        spent_micros: spent,
                        reserved_micros: open,
                    });
                }
                let id = Uuid::now_v7();
                sqlx::query(
                    "INSERT INTO llm_usage (id, provider, model, month, request_id, status, \
                     reserved_micros, reserved_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, 'reserved', $6, $7, $8)",
                )
                .bind(id)
                .bind(&r.provider)
                .bind(&r.model)
                .bind(&r.month)
                .bind(r.request_id)
                .bind(r.amount_micros)
                .bind(ts(at))
                .bind(ts(lease_end(at, r.lease)))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(Reservation::Reserved { id })
            }

            async fn settle_llm(&self, reservation: Uuid, s: &LlmSettlement) -> Result<(), StoreError> {
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                // An expired reservation still settles: a late answer's real cost is recorded.
                let row = sqlx::query(
                    "UPDATE llm_usage SET status = 'settled', cost_micros = $2, input_tokens = $3, \
                     output_tokens = $4, ok = $5, settled_at = $6 \
                     WHERE id = $1 AND status = 'reserved' \
                     RETURNING provider, month",
                )
                .bind(reservation)
                .bind(s.cost_micros)
                .bind(sat_i64(s.input_tokens))
                .bind(sat_i64(s.output_tokens))
                .bind(s.ok)
                .bind(ts(now()))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                let Some(row) = row else {
                    let status: Option<String> =
                        sqlx::query_scalar("SELECT status FROM llm_usage WHERE id = $1")
                            .bind(reservation)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_err)?;
                    return Err(match status {
                        None => StoreError::not_found(format!("llm reservation {reservation}")),
                        Some(st) => StoreError::Conflict {
                            message: format!("llm reservation {reservation} is already settled"),
                            current: Some(st),
                        },
                    });
                };
                let provider: String = col(&row, "provider")?;
                let month: String = col(&row, "month")?;
                sqlx::query(
                    "UPDATE llm_budget SET spent_micros = spent_micros + $3, calls = calls + 1, \
                     input_tokens = input_tokens + $4, output_tokens = output_tokens + $5 \
                     WHERE provider = $1 AND month = $2",
                )
                .bind(&provider)
                .bind(&month)
                .bind(s.cost_micros)
                .bind(sat_i64(s.input_tokens))
                .bind(sat_i64(s.output_tokens))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)
            }

            async fn llm_spend(&self, month: &str) -> Result<Vec<ProviderSpend>, StoreError> {
                let rows = sqlx::query(
                    "SELECT b.provider, b.month, b.spent_micros, \
                     (SELECT CAST(COALESCE(SUM(u.reserved_micros), 0) AS BIGINT) FROM llm_usage u \
                      WHERE u.provider = b.provider AND u.month = b.month \
                      AND u.status = 'reserved' AND u.expires_at > $2) AS reserved_micros, \
                     b.calls, b.input_tokens, b.output_tokens \
                     FROM llm_budget b WHERE b.month = $1 ORDER BY b.provider",
                )
                .bind(month)
                .bind(ts(now()))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(ProviderSpend {
                            provider: col(r, "provider")?,
                            month: col(r, "month")?,
                            spent_micros: col(r, "spent_micros")?,
                            reserved_micros: col(r, "reserved_micros")?,
                            calls: u64_col(r, "calls")?,
                            input_tokens: u64_col(r, "input_tokens")?,
                            output_tokens: u64_col(r, "output_tokens")?,
                        })
                    })
                    .collect()
            }
        }

        #[async_trait]
        impl PlanCache for $Store {
            async fn cached_plan(&self, key: &str) -> Result<Option<Plan>, StoreError> {
                let plan: Option<Json<Plan>> =
                    sqlx::query_scalar("SELECT plan FROM plan_cache WHERE key = $1")
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db_err)?;
                Ok(plan.map(|j| j.0))
            }

            async fn cache_plan(&self, key: &str, plan: &Plan) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO plan_cache (key, plan, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                     ON CONFLICT (key) DO UPDATE SET plan = excluded.plan, updated_at = excluded.updated_at",
                )
                .bind(key)
                .bind(Json(plan))
                .bind(ts(now()))
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(())
            }
        }

        #[async_trait]
        impl AuditLog for $Store {
            async fn append_audit(&self, entries: &[NewAuditEntry]) -> Result<Vec<AuditEntry>, StoreError> {
                if entries.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                let out = self.append_audit_in(&mut tx, entries, None).await?;
                tx.commit().await.map_err(db_err)?;
                if let Some(last) = out.last() {
                    self.head
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .saw(last.seq);
                }
                Ok(out)
            }

            async fn audit_log(
                &self,
                request_id: Option<Uuid>,
                after_seq: i64,
                limit: u32,
            ) -> Result<Vec<AuditEntry>, StoreError> {
                let rows = match request_id {
                    Some(id) => {
                        sqlx::query(concat!(
                            "SELECT ",
                            audit_cols!(),
                            " FROM audit_log WHERE request_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                        ))
                        .bind(id)
                        .bind(after_seq)
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(concat!(
                            "SELECT ",
                            audit_cols!(),
                            " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                        ))
                        .bind(after_seq)
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool)
                        .await
                    }
                }
                .map_err(db_err)?;
                rows.iter().map(|r| Ok(audit_from_row(r)?.0)).collect()
            }

            async fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
                // One read transaction: a snapshot in which the head and the rows agree, whatever
                // appenders do meanwhile.
                let mut tx = self
                    .pool
                    .begin_with(BEGIN_SNAPSHOT)
                    .await
                    .map_err(db_err)?;
                let head = sqlx::query("SELECT last_seq, last_hash FROM audit_head WHERE id = 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?
                    .ok_or_else(|| StoreError::Corrupt("the audit head row is missing".into()))?;
                let head_seq: i64 = col(&head, "last_seq")?;
                let head_hash: String = col(&head, "last_hash")?;
                let mut cursor = chain::ChainCursor::default();
                let mut checked = 0u64;
                loop {
                    let rows = sqlx::query(concat!(
                        "SELECT ",
                        audit_cols!(),
                        " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                    ))
                    .bind(cursor.seq)
                    .bind(VERIFY_PAGE)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    if rows.is_empty() {
                        break;
                    }
                    let mut page = Vec::with_capacity(rows.len());
                    let mut unreadable = None;
                    for r in &rows {
                        let (entry, problem) = audit_from_row(r)?;
                        if let Some(why) = problem {
                            unreadable = Some((entry.seq, why));
                            break;
                        }
                        page.push(entry);
                    }
                    match chain::verify_entries(self.audit_key.as_ref(), &mut cursor, &page) {
                        Ok(()) => checked += page.len() as u64,
                        Err((seq, why)) => {
                            let before = page.iter().take_while(|e| e.seq < seq).count() as u64;
                            return Ok(unverified(checked + before, seq, why));
                        }
                    }
                    if let Some((seq, why)) = unreadable {
                        return Ok(unverified(checked, seq, why));
                    }
                }
                let verdict = chain_verdict(checked, &cursor, head_seq, &head_hash);
                if !verdict.ok {
                    return Ok(verdict);
                }
                // Every request names the newest entry its status changes wrote: a log cut back
                // (its newest entries deleted, the head moved back) no longer has it.
                let cut = sqlx::query(
                    "SELECT t.id, t.audit_seq FROM tasks t WHERE t.audit_seq IS NOT NULL AND \
                     (t.audit_seq > $1 OR NOT EXISTS (SELECT 1 FROM audit_log a \
                      WHERE a.seq = t.audit_seq AND a.request_id = t.id)) \
                     ORDER BY t.audit_seq LIMIT 1",
                )
                .bind(head_seq)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                if let Some(row) = cut {
                    let id: Uuid = col(&row, "id")?;
                    let seq: i64 = col(&row, "audit_seq")?;
                    return Ok(unverified(
                        checked,
                        seq,
                        format!(
                            "entry {seq}, written with request {id}'s last status change, is missing \
                             (the log was cut back or rewritten)"
                        ),
                    ));
                }
                Ok(verdict)
            }

            async fn audit_head(&self) -> Result<(i64, String), StoreError> {
                let head = sqlx::query("SELECT last_seq, last_hash FROM audit_head WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err)?
                    .ok_or_else(|| StoreError::Corrupt("the audit head row is missing".into()))?;
                Ok((col(&head, "last_seq")?, col(&head, "last_hash")?))
            }

            async fn audit_hash_at(&self, seq: i64) -> Result<Option<String>, StoreError> {
                sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
                    .bind(seq)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err)
            }
        }

        #[async_trait]
        impl Store for $Store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn migrate(&self) -> Result<(), StoreError> {
                MIGRATOR
                    .run(&self.pool)
                    .await
                    .map_err(|e| StoreError::Migration(Box::new(e)))
            }

            async fn health(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map_err(|e| match db_err(e) {
                        StoreError::Backend(e) => StoreError::Unavailable(e),
                        e => e,
                    })?;
                Ok(())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::HeadCache;

    #[test]
    fn groups_take_the_head_in_the_order_they_began() {
        let mut h = HeadCache::default();
        h.saw(10);
        let a = h.begin(2);
        let none = h.begin(0);
        let b = h.begin(3);
        // Each base counts the entries promised before it.
        assert_eq!((a.0, none.0, b.0), (10, 12, 12));
        assert!(h.first_in_line(a.1));
        assert!(
            !h.first_in_line(b.1),
            "b began after a, which has not locked the head"
        );
        h.passed(a.1);
        // A group with no entries never takes the head: b does not wait for it to end.
        assert!(h.first_in_line(b.1));
        h.ended(0, none.1, None);
        // a commits: the head moved past its entries; b is still promised its own.
        h.ended(2, a.1, Some(12));
        assert_eq!(h.begin(1).0, 15);
    }

    #[test]
    fn a_group_that_fails_before_the_head_lets_the_next_one_take_it() {
        let mut h = HeadCache::default();
        let a = h.begin(4);
        let b = h.begin(1);
        assert!(!h.first_in_line(b.1));
        // a fails before it locks the head: it leaves the line and promises nothing more.
        h.ended(4, a.1, None);
        assert!(h.first_in_line(b.1));
        assert_eq!(h.begin(1).0, 1);
    }
}
