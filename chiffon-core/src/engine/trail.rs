//! The git trail's writer, off the critical path: a request ends (its status, error and
//! entries stored together) without waiting for git; its record is committed afterwards by
//! one background task, in batches (one pack, one branch move, one fsync per batch; see
//! [`GitTrail::commit_batch`]), and its commit id is stored with its `committed` entry.
//!
//! The backlog is durable: an ended, approved request without a commit id (and without a
//! refusal for good) is waiting, whatever the writer remembers. The writer is handed each
//! request this instance ends, and it also reads the store's backlog ([`Store::uncommitted`])
//! when it starts and every few seconds, so a restart, a full queue or a failed batch loses
//! nothing. A record is rebuilt from stored facts only, byte for byte the same each time, so
//! a crash between the commit and storing its id finds the commit already made and reuses it.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use chiffon_protocol::ErrorCode;
use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::lifecycle::{Inner, GIT_BATCH, STALE_GIT_LOCK};
use super::{with_store_retry, Engine, EngineError};
use crate::audit::git::{ChainAnchor, GitTrail, RequestRecord};
use crate::audit::AuditEvent;
use crate::model::{GroupWrite, NewAuditEntry, Request, RequestStatus, Step};
use crate::store::StoreError;

/// A request ended this long ago and still without its commit is read again from the store
/// (a queue that was full, a batch that failed, an instance that died).
const BACKLOG_AFTER: Duration = Duration::from_secs(5);

/// How often the writer looks at the store's backlog.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// How recently a request must have ended for [`Engine::get_settled`] to wait for its
/// commit id (an older one without it waits on a failing trail: answered as it is).
const SETTLE_RECENT: Duration = Duration::from_secs(10);

/// Requests waiting in memory for the writer; beyond this they wait in the store.
const QUEUE: usize = GIT_BATCH * 4;

/// How long the writer waits for more ended requests after the first one before it writes
/// a batch (unless the batch fills up or someone waits for a commit id): a pack, a branch
/// move and an fsync cost about the same for one record as for many, and their CPU
/// competes with the requests still running. Requests ending one at a time share a batch
/// instead of each paying for one.
const LINGER: Duration = Duration::from_millis(50);

pub(super) enum TrailJob {
    /// A request this instance just ended.
    Ended(Box<Request>),
    /// Write everything waiting, the store's backlog included, then answer.
    Flush(oneshot::Sender<()>),
    /// Someone waits for a commit id: write what is waiting now, without lingering.
    Hurry,
}

impl Engine {
    /// Hands an ended request to the git trail (never waits). Only approved requests get
    /// a record.
    pub(super) fn trail_ended(&self, request: Request) {
        if self.inner.git.is_none() || request.approver.is_none() {
            return;
        }
        // A full queue is fine: the request waits in the store's backlog.
        let _ = self.trail().try_send(TrailJob::Ended(Box::new(request)));
    }

    /// Waits until the git trail has written every record waiting, in memory and in the
    /// store (or failed to: `/health` and `audit verify` say so). At most `limit`.
    pub async fn flush_trail(&self, limit: Duration) {
        if self.inner.git.is_none() {
            return;
        }
        let (done, wait) = oneshot::channel();
        if self.trail().send(TrailJob::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }

    /// The request once its end is settled: one that ended after approval has its commit
    /// id stored (the trail writes it just after the end). Waits at most `limit`, then
    /// answers the request as it is.
    pub async fn settled(&self, id: Uuid, limit: Duration) -> Result<Request, EngineError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut hurried = false;
        loop {
            let r = self.get_request(id).await?;
            if !self.awaits_commit(&r) || tokio::time::Instant::now() >= deadline {
                return Ok(r);
            }
            if !hurried {
                hurried = true;
                let _ = self.trail().try_send(TrailJob::Hurry);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A request with its steps, as [`Engine::get`]; one that ended after approval in the
    /// last [`SETTLE_RECENT`] and whose commit id is not stored yet is answered once it is
    /// (at most `limit` later): a reader that sees the end sees its audit commit.
    pub async fn get_settled(
        &self,
        id: Uuid,
        limit: Duration,
    ) -> Result<super::RequestView, EngineError> {
        let view = self.get(id).await?;
        let r = &view.request;
        let recent = Utc::now() - r.updated_at
            < chrono::TimeDelta::from_std(SETTLE_RECENT).unwrap_or_default();
        if !recent || !self.awaits_commit(r) {
            return Ok(view);
        }
        self.settled(id, limit).await?;
        self.get(id).await
    }

    /// Whether the trail still owes this request its commit id: it ended after approval
    /// and has none (git on).
    fn awaits_commit(&self, r: &Request) -> bool {
        self.inner.git.is_some()
            && r.approver.is_some()
            && r.commit_id.is_none()
            && matches!(
                r.status,
                RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Cancelled
            )
    }

    /// Starts the writer on first use (with the engine's first end, or its run).
    pub(super) fn trail(&self) -> &mpsc::Sender<TrailJob> {
        self.inner.git_writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(Arc::downgrade(&self.inner), rx));
            tx
        })
    }

    /// Commits one batch of ended requests and stores each outcome with its entry.
    async fn write_batch(&self, git: &Arc<GitTrail>, batch: Vec<Request>) {
        let store = &self.inner.store;
        let mut records = Vec::with_capacity(batch.len());
        let mut writes = Vec::new();
        // The batch's steps, read together. Unreadable now: the batch stays in the backlog
        // for a later scan.
        let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
        let mut steps_of = match with_store_retry(|| store.steps_of(&ids)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(requests = ids.len(), error = %e, "audit records postponed: their steps cannot be read");
                return;
            }
        };
        for r in &batch {
            let steps = steps_of.remove(&r.id).unwrap_or_default();
            let record = self.record_of(r, &steps);
            match crate::audit::git::record_digest(&record) {
                Ok(digest) => records.push((record, digest)),
                Err(e) => writes.push(refused(r.id, e.to_string())),
            }
        }
        let anchor = store
            .audit_head()
            .await
            .ok()
            .map(|(seq, hash)| ChainAnchor { seq, hash });
        let (mut records, digests): (Vec<RequestRecord>, Vec<String>) = records.into_iter().unzip();
        for r in &mut records {
            r.anchor = anchor.clone();
        }
        let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
        let git = git.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut out = git.commit_batch(&records);
            // A ref lock left by a crashed writer stops the trail for good unless it goes:
            // clear stale ones and try those records once more.
            if out
                .iter()
                .any(|r| r.as_ref().is_err_and(|e| e.is_transient()))
                && !git.clear_stale_locks(STALE_GIT_LOCK).is_empty()
            {
                let retry: Vec<usize> = (0..out.len())
                    .filter(|&i| out[i].as_ref().is_err_and(|e| e.is_transient()))
                    .collect();
                let again: Vec<RequestRecord> = retry.iter().map(|&i| records[i].clone()).collect();
                for (i, r) in retry.into_iter().zip(git.commit_batch(&again)) {
                    out[i] = r;
                }
            }
            out
        })
        .await;
        let mut transient = None;
        match outcome {
            Ok(results) => {
                for ((id, digest), r) in ids.into_iter().zip(digests).zip(results) {
                    match r {
                        Ok(commit) => writes.push(GroupWrite::Commit {
                            id,
                            commit: Ok(commit.clone()),
                            audit: vec![NewAuditEntry {
                                request_id: Some(id),
                                actor: "engine".into(),
                                event: AuditEvent::Committed,
                                details: json!({ "commit": commit, "record_sha256": digest }),
                            }],
                        }),
                        // Tried again from the backlog.
                        Err(e) if e.is_transient() => {
                            tracing::error!(request = %id, error = %e, "audit commit failed; it is tried again");
                            transient = Some(e.to_string());
                        }
                        Err(e) => {
                            tracing::error!(request = %id, error = %e, "audit commit refused; `chiffon audit verify` reports it");
                            writes.push(refused(id, e.to_string()));
                        }
                    }
                }
            }
            Err(e) => transient = Some(format!("audit commit task failed: {e}")),
        }
        *self
            .inner
            .git_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = transient;
        // Each outcome stored once, group-committed together (another instance that stored
        // one first leaves a conflict here, and nothing twice).
        let stored = self.group_writes(writes).await;
        for s in stored {
            match s {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "an audit commit id was not stored; the backlog finds the commit again")
                }
            }
        }
    }

    /// The record of an ended request: stored facts only, never the clock, so it is the
    /// same each time it is built.
    pub(super) fn record_of(&self, request: &Request, steps: &[Step]) -> RequestRecord {
        let approver = request.approver.clone().unwrap_or_default();
        let summary = request
            .plan
            .as_ref()
            .map(|p| p.summary.clone())
            .unwrap_or_else(|| request.text.clone());
        let finished = steps
            .iter()
            .filter_map(|s| s.finished_at)
            .max()
            .unwrap_or(request.updated_at)
            .max(request.created_at);
        let duration = (finished - request.created_at).num_milliseconds() as f64 / 1000.0;
        let mut document = json!({
            "id": request.id,
            "text": request.text,
            "requester": request.requester,
            "approver": approver,
            "approval_comment": request.approval_comment,
            "dry_run": request.dry_run,
            "outcome": request.status,
            "error": request.error,
            "plan": request.plan,
            "cost_usd": request.plan.as_ref().map(|p| p.estimated_cost_usd),
            "steps": steps.iter().map(|s| json!({
                "seq": s.seq, "action": s.action, "parameters": s.parameters, "status": s.status,
                "attempt": s.attempt, "agent_id": s.agent_id, "changed": s.changed, "diff": s.diff,
                "error": s.error, "output_tail": s.output,
            })).collect::<Vec<_>>(),
            "created_at": request.created_at,
            "finished_at": finished,
            "duration_seconds": duration,
            "trace_id": request.trace_id,
        });
        // The git trail is as permanent as the audit log: no configured secret goes in.
        self.inner.config.redactor.redact_json(&mut document);
        RequestRecord {
            id: request.id,
            summary: if request.dry_run {
                format!("[dry run] {summary}")
            } else {
                summary
            },
            // Set by the writer, once per batch.
            anchor: None,
            author_email: format!(
                "{}@chiffon",
                approver.replace(
                    |c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-',
                    "_"
                )
            ),
            author_name: approver,
            document,
        }
    }
}

/// A record git will never take: stored as refused, with its `commit_failed` entry.
fn refused(id: Uuid, message: String) -> GroupWrite {
    GroupWrite::Commit {
        id,
        audit: vec![NewAuditEntry {
            request_id: Some(id),
            actor: "engine".into(),
            event: AuditEvent::CommitFailed,
            details: json!({ "code": ErrorCode::GitCommitFailed.code(), "message": message }),
        }],
        commit: Err(message),
    }
}

/// The writer: takes ended requests as they come and the store's backlog, commits them in
/// batches of at most [`GIT_BATCH`]. Ends with the engine (its last handle dropped).
async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<TrailJob>) {
    let mut waiting: Vec<Request> = Vec::new();
    let mut queued: HashSet<Uuid> = HashSet::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    // The first look at the backlog takes all of it: what a stopped instance left.
    let mut scanned_once = false;
    let mut next_scan = tokio::time::Instant::now();
    let take = |job: TrailJob,
                waiting: &mut Vec<Request>,
                queued: &mut HashSet<Uuid>,
                flushes: &mut Vec<oneshot::Sender<()>>| match job {
        TrailJob::Ended(r) => {
            if queued.insert(r.id) {
                waiting.push(*r);
            }
        }
        TrailJob::Flush(done) => flushes.push(done),
        TrailJob::Hurry => {}
    };
    loop {
        if waiting.is_empty() && flushes.is_empty() {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => take(job, &mut waiting, &mut queued, &mut flushes),
                    None => return,
                },
                _ = tokio::time::sleep_until(next_scan) => {}
            }
        }
        // More ended requests for the same batch: those already queued, then those that
        // end within the linger (a hurry, a flush or a full batch ends it).
        let linger = tokio::time::Instant::now() + LINGER;
        while waiting.len() < GIT_BATCH {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(_) if waiting.is_empty() || !flushes.is_empty() => break,
                Err(_) => match tokio::time::timeout_at(linger, rx.recv()).await {
                    Ok(Some(job)) => job,
                    Ok(None) | Err(_) => break,
                },
            };
            if matches!(job, TrailJob::Hurry) {
                break;
            }
            take(job, &mut waiting, &mut queued, &mut flushes);
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let engine = Engine { inner };
        let Some(git) = engine.inner.git.clone() else {
            return;
        };
        let flushing = !flushes.is_empty();
        if flushing || tokio::time::Instant::now() >= next_scan {
            let before = if flushing || !scanned_once {
                Utc::now()
            } else {
                Utc::now() - chrono::TimeDelta::from_std(BACKLOG_AFTER).unwrap_or_default()
            };
            let limit = if flushing { 100_000 } else { GIT_BATCH as u32 };
            match engine.inner.store.uncommitted(before, limit).await {
                Ok(backlog) => {
                    scanned_once = true;
                    for r in backlog {
                        if queued.insert(r.id) {
                            waiting.push(r);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the git trail's backlog cannot be read"),
            }
            next_scan = tokio::time::Instant::now() + SCAN_EVERY;
        }
        if !waiting.is_empty() {
            // Since when the trail has had work waiting (kept until it has none).
            engine
                .inner
                .git_busy_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(Instant::now);
        }
        // A flush writes everything it found; otherwise one batch, then new arrivals.
        while !waiting.is_empty() {
            let n = waiting.len().min(GIT_BATCH);
            let batch: Vec<Request> = waiting.drain(..n).collect();
            for r in &batch {
                queued.remove(&r.id);
            }
            engine.write_batch(&git, batch).await;
            if !flushing {
                break;
            }
        }
        if waiting.is_empty() {
            *engine
                .inner
                .git_busy_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}
