//! The one SQL implementation of [`Store`], shared by PostgreSQL and SQLite.
//!
//! The statements, the row conversions and the transaction boundaries are written once, in
//! [`sql_store!`]; each backend module expands it over its own small dialect:
//!
//! - placeholders: `$N` everywhere (sqlx's SQLite driver binds `$N` by number too);
//! - SQL fragments passed to the macro: the row lock of a read-before-write
//!   (`FOR UPDATE` / nothing: SQLite's `BEGIN IMMEDIATE` already holds the one write lock),
//!   the claim's `SKIP LOCKED`, and "status is one of a bound list" (`= ANY($16)` / `IN
//!   (SELECT value FROM json_each($16))`), and whether the audit head may move in a
//!   data-modifying `WITH` of the entries' `INSERT` (PostgreSQL) or in its own statement;
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
use crate::model::{AuditEntry, AuditVerification, NewAuditEntry, RequestStatus};

/// Rows per multi-row INSERT (PostgreSQL allows 65535 bound parameters per statement,
/// SQLite 32766).
pub(super) const INSERT_CHUNK: usize = 500;
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
        one_of_16: $one_of_16:literal,
        head_in_insert: $head_in_insert:literal $(,)?
    ) => {
        /// A [`Store`](crate::store::Store) over one connection pool. Cheap to clone (a pool
        /// handle).
        #[derive(Clone)]
        pub struct $Store {
            pool: $Pool,
            /// Keys the audit chain (HMAC) when set.
            audit_key: Option<AuditKey>,
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
                    q.build().execute(&mut **tx).await.map_err(db_err)?;
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
                // A step that becomes ready joins the dispatch queue now unless told otherwise.
                let ready_at = patch
                    .ready_at
                    .or_else(|| (to == StepStatus::Ready).then(Utc::now));
                let row = sqlx::query(concat!(
                    "UPDATE plan_steps SET status = $1, attempt = COALESCE($2, attempt), \
                     agent_id = COALESCE($3, agent_id), queue = COALESCE($4, queue), \
                     progress = COALESCE($5, progress), output = COALESCE($6, output), \
                     diff = COALESCE($7, diff), changed = COALESCE($8, changed), \
                     error = COALESCE($9, error), ready_at = COALESCE($10, ready_at), \
                     dispatched_at = COALESCE($11, dispatched_at), \
                     deadline_at = COALESCE($12, deadline_at), \
                     finished_at = COALESCE($13, finished_at), \
                     not_before = COALESCE($14, not_before), claimed_by = NULL, claim_until = NULL, \
                     broker_user = CASE WHEN $17 IS NULL THEN broker_user ELSE $17 END, \
                     broker_attempt = CASE WHEN $17 IS NULL THEN broker_attempt \
                     ELSE COALESCE($2, attempt) END \
                     WHERE task_id = $15 AND ($17 IS NULL OR broker_attempt IS NULL \
                     OR broker_attempt <> COALESCE($2, attempt) OR broker_user = $17) AND status ",
                    $one_of_16,
                    " RETURNING ",
                    step_cols!()
                ))
                .bind(to.as_str())
                .bind(patch.attempt.map(i64::from))
                .bind(&patch.agent_id)
                .bind(&patch.queue)
                .bind(patch.progress.map(i64::from))
                .bind(&patch.output)
                .bind(&patch.diff)
                .bind(patch.changed)
                .bind(patch.error.as_ref().map(Json))
                .bind(ready_at.map(|t| ts(trunc(t))))
                .bind(patch.dispatched_at.map(|t| ts(trunc(t))))
                .bind(patch.deadline_at.map(|t| ts(trunc(t))))
                .bind(patch.finished_at.map(|t| ts(trunc(t))))
                .bind(patch.not_before.map(|t| ts(trunc(t))))
                .bind(task_id)
                .bind(status_list(from)?)
                .bind(&patch.reported_by)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
                Ok(match row {
                    Some(row) => step_from_row(&row),
                    None => {
                        let current: Option<String> =
                            sqlx::query_scalar("SELECT status FROM plan_steps WHERE task_id = $1")
                                .bind(task_id)
                                .fetch_optional(&mut *conn)
                                .await
                                .map_err(db_err)?;
                        Err(step_conflict(task_id, current))
                    }
                })
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
                    q.build().execute(&mut *conn).await.map_err(db_err)?;
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
                let at = now();
                let until = claim.map(|(_, lease)| {
                    ts(trunc(
                        at + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX),
                    ))
                });
                let row = sqlx::query(concat!(
                    "INSERT INTO tasks (id, trace_id, text, requester, dry_run, status, created_at, \
                     updated_at, submitted_by, audit_seq, planning_owner, planning_until) \
                     VALUES ($1, $2, $3, $4, $5, 'planning', $6, $6, $7, $8, $9, $10) \
                     ON CONFLICT (id) DO NOTHING RETURNING ",
                    req_cols!()
                ))
                .bind(req.id)
                .bind(&req.trace_id)
                .bind(&req.text)
                .bind(&req.requester)
                .bind(req.dry_run)
                .bind(ts(at))
                .bind(&req.submitted_by)
                .bind(audit_seq)
                .bind(claim.map(|(owner, _)| owner))
                .bind(until)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
                Ok(match row {
                    Some(row) => request_from_row(&row),
                    None => Err(StoreError::Conflict {
                        message: format!("request {} already exists", req.id),
                        current: None,
                    }),
                })
            }

            /// One transition inside a group's transaction: the outer error fails the group
            /// (the database, steps that cannot be written), the inner one is this
            /// transition's own outcome (illegal, changed meanwhile, unknown).
            async fn transition_in(
                &self,
                tx: &mut sqlx::Transaction<'static, $Db>,
                id: Uuid,
                from: RequestStatus,
                to: RequestStatus,
                patch: &RequestPatch,
                audit_seq: Option<i64>,
            ) -> Result<Result<Request, StoreError>, StoreError> {
                if !from.can_transition_to(to) {
                    return Ok(Err(StoreError::Conflict {
                        message: format!("illegal transition from {from} to {to}"),
                        current: None,
                    }));
                }
                let row = sqlx::query(concat!(
                    "UPDATE tasks SET status = $1, updated_at = $2, plan = COALESCE($3, plan), \
                     approver = COALESCE($4, approver), \
                     approval_comment = COALESCE($5, approval_comment), \
                     error = COALESCE($6, error), commit_id = COALESCE($7, commit_id), \
                     audit_seq = COALESCE($10, audit_seq) \
                     WHERE id = $8 AND status = $9 RETURNING ",
                    req_cols!()
                ))
                .bind(to.as_str())
                .bind(ts(now()))
                .bind(patch.plan.as_ref().map(Json))
                .bind(&patch.approver)
                .bind(&patch.approval_comment)
                .bind(patch.error.as_ref().map(Json))
                .bind(&patch.commit_id)
                .bind(id)
                .bind(from.as_str())
                .bind(audit_seq)
                .fetch_optional(&mut **tx)
                .await
                .map_err(db_err)?;
                let Some(row) = row else {
                    let current: Option<String> =
                        sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&mut **tx)
                            .await
                            .map_err(db_err)?;
                    return Ok(Err(why_not(id, from, current)));
                };
                // Queued with its plan: the first step is stored ready (it joins the dispatch
                // queue in this transaction; the others wait for the one before them).
                let ready_now = to == RequestStatus::Queued;
                let ready_at = ts(now());
                if let Some(plan) = &patch.plan {
                    for (n, chunk) in plan.steps.chunks(INSERT_CHUNK).enumerate() {
                        let mut q = QueryBuilder::<$Db>::new(
                            "INSERT INTO plan_steps (task_id, request_id, seq, action, parameters, \
                             agent_type, resources, status, ready_at) ",
                        );
                        q.push_values(chunk.iter().enumerate(), |mut b, (i, s)| {
                            let seq = n * INSERT_CHUNK + i;
                            let ready = ready_now && seq == 0;
                            b.push_bind(Uuid::now_v7())
                                .push_bind(id)
                                .push_bind(seq as i64)
                                .push_bind(&s.action)
                                .push_bind(Json(&s.parameters))
                                .push_bind(&s.agent_type)
                                .push_bind(Json(&s.resources))
                                .push_bind(if ready {
                                    StepStatus::Ready.as_str()
                                } else {
                                    StepStatus::Pending.as_str()
                                })
                                .push_bind(ready.then_some(&ready_at));
                        });
                        q.build()
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| match db_err(e) {
                                StoreError::Conflict { current, .. } => StoreError::Conflict {
                                    message: format!("request {id} already has steps"),
                                    current,
                                },
                                e => e,
                            })?;
                    }
                }
                if ready_now && patch.plan.is_none() {
                    // Approved: its first step joins the dispatch queue in the same
                    // transaction (the others wait for the one before them).
                    sqlx::query(
                        "UPDATE plan_steps SET status = 'ready', ready_at = $2 \
                         WHERE request_id = $1 AND status = 'pending' \
                         AND seq = (SELECT MIN(seq) FROM plan_steps WHERE request_id = $1)",
                    )
                    .bind(id)
                    .bind(ts(now()))
                    .execute(&mut **tx)
                    .await
                    .map_err(db_err)?;
                }
                Ok(request_from_row(&row))
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
                        " FROM tasks WHERE id IN ("
                    ));
                    let mut each = q.separated(", ");
                    for id in chunk {
                        each.push_bind(*id);
                    }
                    q.push(")");
                    for row in q.build().fetch_all(&self.pool).await.map_err(db_err)? {
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
                let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_err)?;
                let mut out = Vec::with_capacity(writes.len());
                let mut entries: Vec<NewAuditEntry> = Vec::new();
                // The chain's head, locked once for the group: each request changed names
                // its newest entry (`audit_seq`) in the same statement that changes it, and
                // verify finds that entry gone if the log is cut back.
                let carries = writes.iter().any(GroupWrite::carries_audit);
                let head = if carries {
                    Some(Self::lock_audit_head(&mut tx).await?)
                } else {
                    None
                };
                let base: i64 = head.as_ref().map_or(0, |h| h.0);
                // The seq the newest of `audit` gets if it is appended next.
                let newest = |entries: &Vec<NewAuditEntry>, audit: &[NewAuditEntry]| {
                    (!audit.is_empty()).then(|| base + (entries.len() + audit.len()) as i64)
                };
                // A request created with its planning claim (a `ClaimPlanning` of it right
                // after its `Create`): the claim is stored in the INSERT; its slot.
                let mut born_claimed: Option<(Uuid, bool)> = None;
                for (i, w) in writes.iter().enumerate() {
                    match w {
                        GroupWrite::Transition {
                            id,
                            from,
                            to,
                            patch,
                        } => {
                            let seq = newest(&entries, &patch.audit);
                            let slot = self
                                .transition_in(&mut tx, *id, *from, *to, patch, seq)
                                .await?;
                            if slot.is_ok() {
                                entries.extend(patch.audit.iter().cloned());
                            }
                            out.push(slot.map(Written::Request));
                        }
                        GroupWrite::Create { request, audit } => {
                            let seq = newest(&entries, audit);
                            let claim = match writes.get(i + 1) {
                                Some(GroupWrite::ClaimPlanning { id, owner, lease })
                                    if *id == request.id =>
                                {
                                    Some((owner.as_str(), *lease))
                                }
                                _ => None,
                            };
                            let slot = self.create_in(&mut tx, request, seq, claim).await?;
                            if claim.is_some() {
                                born_claimed = Some((request.id, slot.is_ok()));
                            }
                            if slot.is_ok() {
                                entries.extend(audit.iter().cloned());
                            }
                            out.push(slot.map(Written::Request));
                        }
                        GroupWrite::Step {
                            task_id,
                            from,
                            to,
                            patch,
                            logs,
                            audit,
                        } => {
                            let slot = self
                                .update_step_in(&mut tx, *task_id, from, *to, patch)
                                .await?;
                            if slot.is_ok() {
                                self.append_logs_in(&mut tx, logs).await?;
                                entries.extend(audit.iter().cloned());
                            }
                            out.push(slot.map(Written::Step));
                        }
                        GroupWrite::Audit(e) => {
                            entries.extend(e.iter().cloned());
                            out.push(Ok(Written::Appended));
                        }
                        GroupWrite::Logs(lines) => {
                            self.append_logs_in(&mut tx, lines).await?;
                            out.push(Ok(Written::Appended));
                        }
                        GroupWrite::Advance {
                            request_id,
                            after_seq,
                            audit,
                        } => {
                            let now = ts(now());
                            let next = sqlx::query(
                                "UPDATE plan_steps SET status = 'ready', ready_at = $3 \
                                 WHERE request_id = $1 AND seq = $2 + 1 AND status = 'pending' \
                                 AND EXISTS (SELECT 1 FROM plan_steps WHERE request_id = $1 \
                                 AND seq = $2 AND status = 'completed')",
                            )
                            .bind(request_id)
                            .bind(i64::from(*after_seq))
                            .bind(&now)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                            if next.rows_affected() > 0 {
                                out.push(Ok(Written::Advanced(None)));
                                continue;
                            }
                            let row = sqlx::query(concat!(
                                "UPDATE tasks SET status = 'completed', updated_at = $2, \
                                 audit_seq = COALESCE($3, audit_seq) \
                                 WHERE id = $1 AND status IN ('queued', 'running') \
                                 AND NOT EXISTS (SELECT 1 FROM plan_steps WHERE request_id = $1 \
                                 AND status NOT IN ('completed', 'skipped')) RETURNING ",
                                req_cols!()
                            ))
                            .bind(request_id)
                            .bind(&now)
                            .bind(newest(&entries, audit))
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_err)?;
                            match row {
                                Some(row) => {
                                    let done = request_from_row(&row);
                                    if done.is_ok() {
                                        entries.extend(audit.iter().cloned());
                                    }
                                    out.push(done.map(|r| Written::Advanced(Some(r))));
                                }
                                None => out.push(Ok(Written::Advanced(None))),
                            }
                        }
                        GroupWrite::ClaimPlanning { id, owner, lease } => {
                            let claimed = match born_claimed.take() {
                                Some((born, claimed)) if born == *id => claimed,
                                _ => self.claim_planning_in(&mut tx, *id, owner, *lease).await?,
                            };
                            out.push(if claimed {
                                Ok(Written::Appended)
                            } else {
                                Err(StoreError::Conflict {
                                    message: format!("request {id} is not planning or is claimed by another"),
                                    current: None,
                                })
                            });
                        }
                        GroupWrite::Send(m) => {
                            let done = sqlx::query(
                                "INSERT INTO outbox (id, task_id, attempt, queue, body, created_at) \
                                 SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM plan_steps \
                                 WHERE task_id = $2 AND status = 'dispatched' AND attempt = $3)",
                            )
                            .bind(m.id)
                            .bind(m.task_id)
                            .bind(i64::from(m.attempt))
                            .bind(&m.queue)
                            .bind(&m.body)
                            .bind(ts(trunc(m.created_at)))
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                            out.push(if done.rows_affected() == 1 {
                                Ok(Written::Appended)
                            } else {
                                Err(StoreError::Conflict {
                                    message: format!(
                                        "step {} is not dispatched with attempt {}",
                                        m.task_id, m.attempt
                                    ),
                                    current: None,
                                })
                            });
                        }
                        GroupWrite::Sent(ids) => {
                            for chunk in ids.chunks(INSERT_CHUNK) {
                                let mut q = QueryBuilder::<$Db>::new("DELETE FROM outbox WHERE id IN (");
                                let mut each = q.separated(", ");
                                for id in chunk {
                                    each.push_bind(*id);
                                }
                                q.push(")");
                                q.build().execute(&mut *tx).await.map_err(db_err)?;
                            }
                            out.push(Ok(Written::Appended));
                        }
                        GroupWrite::Preview {
                            task_id,
                            preview,
                            start,
                            audit,
                        } => {
                            let applied =
                                self.write_preview_in(&mut tx, *task_id, preview, *start).await?;
                            out.push(if applied {
                                entries.extend(audit.iter().cloned());
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
                            });
                        }
                        GroupWrite::Commit { id, commit, audit } => {
                            let (commit_id, failed) = match commit {
                                Ok(c) => (Some(c.as_str()), None),
                                Err(e) => (None, Some(e.as_str())),
                            };
                            let row = sqlx::query(concat!(
                                "UPDATE tasks SET commit_id = $1, commit_error = $2, \
                                 audit_seq = COALESCE($4, audit_seq) \
                                 WHERE id = $3 AND commit_id IS NULL AND commit_error IS NULL \
                                 RETURNING ",
                                req_cols!()
                            ))
                            .bind(commit_id)
                            .bind(failed)
                            .bind(id)
                            .bind(newest(&entries, audit))
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_err)?;
                            let slot = match row {
                                Some(row) => request_from_row(&row),
                                None => Err(StoreError::Conflict {
                                    message: format!(
                                        "request {id} is unknown or its git record is already stored"
                                    ),
                                    current: None,
                                }),
                            };
                            if slot.is_ok() {
                                entries.extend(audit.iter().cloned());
                            }
                            out.push(slot.map(Written::Request));
                        }
                    }
                }
                if !entries.is_empty() {
                    let written = self.append_audit_in(&mut tx, &entries, head).await?;
                    if written.first().map(|e| e.seq) != Some(base + 1) {
                        return Err(StoreError::Corrupt(
                            "the audit chain's head moved while it was locked".into(),
                        ));
                    }
                }
                tx.commit().await.map_err(db_err)?;
                Ok(out)
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
