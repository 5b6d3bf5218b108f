//! The engine's background work: intake, results, dispatch, timeouts, expiry, repair.

use crate::audit::AuditEvent;
use crate::model::GroupWrite;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chiffon_protocol::{
    Cancel, Envelope, ErrorCode, ErrorPayload, Message, TaskState, WorkResult, WorkStatus,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{
    NewAuditEntry, NewLogLine, RequestFilter, RequestPatch, RequestStatus, StepPatch, StepStatus,
    Written,
};
use crate::transport::{ConsumeOptions, Delivery};

/// Most output kept on a step (the tail).
const OUTPUT_TAIL: usize = 16 * 1024;
/// An outbox message this old was not published by its dispatcher: the relay sends it.
pub(super) const OUTBOX_AFTER: Duration = Duration::from_secs(10);
/// A request `planning` this long was interrupted and is planned again.
const STALE_PLANNING: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Queued/running requests untouched this long are reconciled by the sweeper.
const REPAIR_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

pub(super) fn chrono_dur(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// A report on an attempt bound to another agent's broker user.
fn not_theirs(step: &Step) -> EngineError {
    EngineError::PublisherNotAllowed(format!(
        "task {} attempt {} belongs to another agent",
        step.task_id, step.attempt
    ))
}

fn tail(s: &str) -> String {
    if s.len() <= OUTPUT_TAIL {
        return s.to_string();
    }
    let mut start = s.len() - OUTPUT_TAIL;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// A message that fails this many times in a row (transient errors) is dead-lettered.
pub const MAX_FAILED_DELIVERIES: u32 = 5;

/// The task a message reports on.
fn task_of(m: &Message) -> Option<Uuid> {
    match m {
        Message::WorkStatus(s) => Some(s.task_id),
        Message::WorkResult(r) => Some(r.task_id),
        _ => None,
    }
}

/// A task's newest turn: its number and the signal that it is done.
type LastTurn = (u64, tokio::sync::watch::Receiver<bool>);

/// Keeps the messages about one task in arrival order while others run at once: each
/// message's turn waits for the one before it about the same task.
#[derive(Default, Clone)]
struct TaskOrder {
    last: Arc<std::sync::Mutex<HashMap<Uuid, LastTurn>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

struct Turn {
    task: Uuid,
    n: u64,
    before: Option<tokio::sync::watch::Receiver<bool>>,
    done: tokio::sync::watch::Sender<bool>,
    order: TaskOrder,
}

/// Held while a message is handled; its drop lets the next message about the task go.
struct TurnDone {
    task: Uuid,
    n: u64,
    done: tokio::sync::watch::Sender<bool>,
    order: TaskOrder,
}

impl TaskOrder {
    /// Taken in arrival order (synchronously, as each delivery comes).
    fn turn(&self, task: Uuid) -> Turn {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = tokio::sync::watch::channel(false);
        let before = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task, (n, rx))
            .map(|(_, rx)| rx);
        Turn {
            task,
            n,
            before,
            done,
            order: self.clone(),
        }
    }
}

impl Turn {
    /// Waits until the message before it about the same task was handled.
    async fn wait(self) -> TurnDone {
        if let Some(mut before) = self.before {
            // An error: the one before is gone (handled and dropped): go.
            let _ = before.wait_for(|done| *done).await;
        }
        TurnDone {
            task: self.task,
            n: self.n,
            done: self.done,
            order: self.order,
        }
    }
}

impl Drop for TurnDone {
    fn drop(&mut self) {
        let _ = self.done.send(true);
        let mut last = self.order.last.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the task unless a newer message about it is queued behind this one.
        if last.get(&self.task).is_some_and(|(n, _)| *n == self.n) {
            last.remove(&self.task);
        }
    }
}

/// Handles a consumer's deliveries, up to `limit` at once, until `stop` is cancelled.
async fn consume_each<F, Fut>(
    consumer: crate::transport::Consumer,
    limit: usize,
    stop: CancellationToken,
    what: &'static str,
    handle: F,
) where
    F: Fn(Delivery) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    consumer
        .take_until(stop.cancelled_owned())
        .for_each_concurrent(limit, |d| {
            let fut = d.map(&handle);
            async move {
                match fut {
                    Ok(f) => f.await,
                    Err(e) => tracing::warn!(error = %e, consumer = what, "consumer error"),
                }
            }
        })
        .await
}

impl Engine {
    /// Runs the engine until `shutdown` is cancelled: declares the topology, consumes
    /// `orchestrator.requests` and `orchestrator.results`, dispatches ready steps and sweeps
    /// for timeouts, expired approvals and interrupted requests.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let t = self.inner.transport.topology().clone();
        self.inner.transport.declare_topology().await?;
        let prefetch = self.inner.config.dispatch.prefetch;
        let requests = self
            .inner
            .transport
            .consume(&t.requests_queue, ConsumeOptions { prefetch })
            .await?;
        let results = self
            .inner
            .transport
            .consume(&t.results_queue, ConsumeOptions { prefetch })
            .await?;
        tracing::info!(instance = %self.inner.config.instance_id, store = self.inner.store.backend(), bus = self.inner.transport.backend(), "engine running");
        // The git trail's writer starts now: it first writes what a stopped instance left.
        if self.inner.git.is_some() {
            self.trail();
        }

        let limit = prefetch.max(1) as usize;
        let intake = consume_each(requests, limit, shutdown.clone(), "intake", {
            let engine = self.clone();
            move |d| {
                let engine = engine.clone();
                async move { engine.on_intake(d).await }
            }
        });
        // Messages about one task are handled in the order they came (a step's progress
        // before its result); messages about different tasks at once.
        let order = TaskOrder::default();
        let results = consume_each(results, limit, shutdown.clone(), "results", {
            let engine = self.clone();
            move |d| {
                let engine = engine.clone();
                let parsed = d.parse();
                let turn = parsed
                    .as_ref()
                    .ok()
                    .and_then(|env| task_of(&env.body))
                    .map(|task| order.turn(task));
                async move {
                    let _done = match turn {
                        Some(turn) => Some(turn.wait().await),
                        None => None,
                    };
                    engine.on_result_delivery(d, parsed).await
                }
            }
        });
        let dispatcher = {
            let engine = self.clone();
            let stop = shutdown.clone();
            async move {
                let tick = engine.inner.config.dispatch.tick;
                let mut last_sweep = tokio::time::Instant::now() - tick;
                loop {
                    if let Err(e) = engine.dispatch_all().await {
                        tracing::warn!(error = %e, "dispatch round failed");
                    }
                    if last_sweep.elapsed() >= tick {
                        last_sweep = tokio::time::Instant::now();
                        if let Err(e) = engine.sweep().await {
                            tracing::warn!(error = %e, "sweep failed");
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = engine.inner.wake.notified() => {}
                        _ = tokio::time::sleep(tick) => {}
                    }
                }
            }
        };
        tokio::join!(intake, results, dispatcher);
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.inner.tasks.wait()).await;
        // The records of the requests that ended are written before the engine stops (a
        // crash leaves them in the store's backlog instead, for the next start).
        self.flush_trail(Duration::from_secs(10)).await;
        tracing::info!(instance = %self.inner.config.instance_id, "engine stopped");
        Ok(())
    }

    /// A `user_request` from the bus: handled exactly like `POST /request`; acked once stored.
    /// Its requester is the broker-authenticated publisher (`bus:USER`), never a body field.
    async fn on_intake(&self, d: Delivery) {
        let env = match d.parse() {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(code = e.code.code(), error = %e, "unparsable message on the requests queue: dead-lettered");
                let _ = d.dead_letter().await;
                return;
            }
        };
        let Message::UserRequest(u) = &env.body else {
            tracing::warn!(
                message_type = env.message_type(),
                "unexpected message on the requests queue: dead-lettered"
            );
            let _ = d.dead_letter().await;
            return;
        };
        let publisher = match d.publisher.as_deref() {
            Some(p) if self.inner.config.bus.may_submit(p) => p.to_string(),
            other => {
                let why = match other {
                    None => "no user_id: the publisher is not authenticated".to_string(),
                    Some(p) => format!("broker user `{p}` may not submit requests"),
                };
                self.refuse(&d, &env, &why).await;
                return;
            }
        };
        let identity = format!("bus:{publisher}");
        let submit = SubmitRequest {
            text: u.text.clone(),
            requester: Some(identity.clone()),
            submitted_by: Some(identity),
            dry_run: u.dry_run,
            trace_id: Some(env.trace_id.clone()),
            // A redelivered message maps to the same request: never planned twice.
            request_id: Some(env.request_id.unwrap_or(env.message_id)),
        };
        match self.submit(submit).await {
            Ok(_) => {
                self.forget_failures(env.message_id);
                let _ = d.ack().await;
            }
            Err(EngineError::Invalid(msg)) => {
                tracing::warn!(error = %msg, "invalid user_request: dead-lettered");
                let _ = d.dead_letter().await;
            }
            Err(e) => {
                self.retry_or_dead_letter(&d, &env, &e.to_string()).await;
            }
        }
    }

    /// Dead-letters a message whose publisher may not send it, and says so.
    async fn refuse(&self, d: &Delivery, env: &Envelope, why: &str) {
        self.inner.metrics.refused.fetch_add(1, Ordering::Relaxed);
        // Logged at most once a minute per sender (a refused heartbeat comes every few
        // seconds); `GET /agents` lists the latest.
        let code = ErrorCode::PublisherNotAllowed.code();
        if let Some(unlogged) = self.note_refused(d, env, code, why) {
            tracing::warn!(
                code,
                publisher = d.publisher.as_deref().unwrap_or("-"),
                message_type = env.message_type(),
                reason = why,
                unlogged,
                "bus message refused: dead-lettered"
            );
        }
        let _ = d.dead_letter().await;
    }

    /// Requeues a delivery that failed for a transient reason, unless its message has
    /// failed [`MAX_FAILED_DELIVERIES`] times in a row here: then it is dead-lettered,
    /// never retried forever.
    async fn retry_or_dead_letter(&self, d: &Delivery, env: &Envelope, why: &str) {
        let n = {
            let mut failed = self
                .inner
                .metrics
                .failed_deliveries
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Bounded: a flood of distinct failing messages cannot grow it without end.
            if failed.len() >= 10_000 {
                failed.clear();
            }
            let n = failed.entry(env.message_id).or_insert(0);
            *n += 1;
            let n = *n;
            if n >= MAX_FAILED_DELIVERIES {
                failed.remove(&env.message_id);
            }
            n
        };
        if n >= MAX_FAILED_DELIVERIES {
            self.inner
                .metrics
                .delivery_limit
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                code = ErrorCode::DeliveryLimit.code(),
                message_id = %env.message_id,
                message_type = env.message_type(),
                failures = n,
                error = why,
                "message failed too many times: dead-lettered"
            );
            let _ = d.dead_letter().await;
        } else {
            tracing::warn!(message_id = %env.message_id, failures = n, error = why, "message not processed yet; requeued");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(n))).await;
            let _ = d.requeue().await;
        }
    }

    fn forget_failures(&self, message_id: Uuid) {
        let mut failed = self
            .inner
            .metrics
            .failed_deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !failed.is_empty() {
            failed.remove(&message_id);
        }
    }

    /// A delivery from the results queue, `parsed` as its consumer read it.
    async fn on_result_delivery(
        &self,
        d: Delivery,
        parsed: Result<Envelope, chiffon_protocol::ProtocolError>,
    ) {
        let env = match parsed {
            Ok(env) => env,
            Err(e) => {
                self.note_unparsable(&d, &e);
                let _ = d.dead_letter().await;
                return;
            }
        };
        if matches!(
            env.body,
            Message::UserRequest(_) | Message::WorkRequest(_) | Message::Cancel(_)
        ) {
            tracing::warn!(
                message_type = env.message_type(),
                "unexpected message on the results queue: dead-lettered"
            );
            let _ = d.dead_letter().await;
            return;
        }
        // Everything on the results queue speaks for an agent: only an authenticated agent
        // user may send it.
        let publisher = match d.publisher.as_deref() {
            Some(p) if self.inner.config.bus.may_act_as_agent(p) => p.to_string(),
            other => {
                let why = match other {
                    None => "no user_id: the publisher is not authenticated".to_string(),
                    Some(p) => format!("broker user `{p}` is not an agent user"),
                };
                self.refuse(&d, &env, &why).await;
                return;
            }
        };
        let outcome = match &env.body {
            Message::Heartbeat(hb) => {
                let r = self
                    .inner
                    .store
                    .record_heartbeat(hb, env.timestamp, Some(&publisher))
                    .await
                    .map_err(|e| match e {
                        StoreError::Conflict { message, .. } => EngineError::PublisherNotAllowed(
                            format!("heartbeat refused: {message}"),
                        ),
                        e => e.into(),
                    });
                self.inner.wake.notify_one();
                if r.is_ok() {
                    self.note_accepted(&hb.agent_id, &publisher);
                }
                r
            }
            Message::WorkStatus(s) => self.on_status(&env, s, &publisher).await,
            Message::WorkResult(r) => self.on_result(&env, r, &publisher).await,
            // The report is the decision: acked only once its entry is stored (a database
            // outage redelivers it, then dead-letters it).
            Message::Error(e) => self
                .group_write(GroupWrite::Audit(vec![NewAuditEntry {
                    request_id: env.request_id,
                    actor: format!("bus:{publisher}"),
                    event: AuditEvent::AgentError,
                    details: json!({ "code": e.code.code(), "message": e.message, "details": e.details }),
                }]))
                .await
                .map(|_| ())
                .map_err(EngineError::from),
            _ => Ok(()),
        };
        match outcome {
            Ok(()) => {
                self.forget_failures(env.message_id);
                let _ = d.ack().await;
            }
            Err(EngineError::PublisherNotAllowed(why)) => {
                if let (Some(request_id), Some(task_id)) = (env.request_id, task_of(&env.body)) {
                    self.audit(vec![NewAuditEntry {
                        request_id: Some(request_id),
                        actor: format!("bus:{publisher}"),
                        event: AuditEvent::MessageRefused,
                        details: json!({
                            "code": ErrorCode::PublisherNotAllowed.code(),
                            "message_type": env.message_type(),
                            "task_id": task_id,
                            "reason": why,
                        }),
                    }])
                    .await;
                }
                self.refuse(&d, &env, &why).await;
            }
            Err(e) if e.code().is_transient() => {
                self.retry_or_dead_letter(&d, &env, &e.to_string()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "result could not be applied: dead-lettered");
                let _ = d.dead_letter().await;
            }
        }
    }

    /// Whether `publisher` may report on the step's attempt `attempt`: the attempt is bound
    /// to the agent it was dispatched to, or else to the first agent user that reports on
    /// it (a conditional write, so two agents racing cannot both win).
    async fn may_report(
        &self,
        step: &Step,
        attempt: u32,
        publisher: &str,
    ) -> Result<bool, EngineError> {
        if attempt != step.attempt {
            return Ok(false);
        }
        match step.broker_user.as_deref() {
            Some(bound) => Ok(bound == publisher),
            None => Ok(self
                .inner
                .store
                .bind_step_publisher(step.task_id, attempt, publisher)
                .await?),
        }
    }

    async fn on_status(
        &self,
        env: &Envelope,
        s: &WorkStatus,
        publisher: &str,
    ) -> Result<(), EngineError> {
        let step = match self.inner.store.get_step(s.task_id).await {
            Ok(step) => step,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if s.attempt.is_some_and(|a| a != step.attempt) {
            tracing::debug!(task = %s.task_id, "status of an older attempt ignored");
            return Ok(());
        }
        let starts = step.status == StepStatus::Dispatched
            && matches!(s.status, TaskState::Accepted | TaskState::Running);
        match step.broker_user.as_deref() {
            Some(bound) if bound != publisher => return Err(not_theirs(&step)),
            Some(_) => {}
            // Unbound: the step's move to running binds it (in that change); otherwise a
            // write of its own.
            None if starts => {}
            None => {
                if !self.may_report(&step, step.attempt, publisher).await? {
                    return Err(not_theirs(&step));
                }
            }
        }
        let at = env.timestamp;
        // Shown live and stored: strike configured secrets an agent's output may echo.
        let redactor = &self.inner.config.redactor;
        let message = redactor.redact(&s.message).into_owned();
        let output: Vec<String> = s
            .lines
            .iter()
            .map(|l| redactor.redact(l).into_owned())
            .collect();
        let mut lines = vec![NewLogLine {
            request_id: step.request_id,
            task_id: Some(step.task_id),
            at,
            kind: "status".into(),
            progress: Some(s.progress),
            message: message.clone(),
        }];
        lines.extend(output.iter().map(|line| NewLogLine {
            request_id: step.request_id,
            task_id: Some(step.task_id),
            at,
            kind: "output".into(),
            progress: None,
            message: line.clone(),
        }));
        // The step's move to running (binding its attempt to this agent) and the lines go
        // through the group writer; stored first, shown after: whoever sees a live line can
        // read it from the log.
        let mut logs = Some(GroupWrite::Logs(lines));
        if starts {
            let binds = step.broker_user.is_none();
            let mut writes = vec![GroupWrite::Step {
                task_id: step.task_id,
                from: vec![StepStatus::Dispatched],
                to: StepStatus::Running,
                patch: Box::new(StepPatch {
                    progress: Some(s.progress),
                    agent_id: s.agent_id.clone(),
                    reported_by: binds.then(|| publisher.to_string()),
                    ..Default::default()
                }),
                logs: Vec::new(),
                audit: Vec::new(),
            }];
            // Already bound to this agent: its lines go with the change. Binding it now: the
            // lines wait for the change, so a losing reporter's lines are never stored.
            if !binds {
                writes.extend(logs.take());
            }
            let mut slots = self.group_writes(writes).await.into_iter();
            match slots.next() {
                Some(Ok(_)) => self.inner.events.publish(EngineEvent::Step {
                    request_id: step.request_id,
                    task_id: step.task_id,
                    seq: step.seq,
                    status: StepStatus::Running,
                    at: Utc::now(),
                }),
                Some(Err(StoreError::Conflict { .. })) => {
                    // Moved on meanwhile, or bound to another agent first.
                    let now = self.inner.store.get_step(step.task_id).await?;
                    if now.attempt == step.attempt
                        && now.broker_user.as_deref().is_some_and(|b| b != publisher)
                    {
                        return Err(not_theirs(&now));
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
            if let Some(Err(e)) = slots.next() {
                tracing::warn!(error = %e, task = %step.task_id, "execution log append failed")
            }
        }
        if let Some(logs) = logs {
            if let Err(e) = self.group_write(logs).await {
                tracing::warn!(error = %e, task = %step.task_id, "execution log append failed")
            }
        }
        self.inner.events.publish(EngineEvent::Progress {
            request_id: step.request_id,
            task_id: step.task_id,
            seq: step.seq,
            progress: s.progress,
            message,
            at,
        });
        for line in output {
            self.inner.events.publish(EngineEvent::Output {
                request_id: step.request_id,
                task_id: step.task_id,
                seq: step.seq,
                line,
                at,
            });
        }
        Ok(())
    }

    /// Applies a `work_result` once: only to the step's current attempt while it is
    /// `dispatched` or `running` (conditional update), so duplicates and redeliveries are
    /// acknowledged, change nothing, and are recorded (`duplicate_result`). A result may
    /// come with no status before it (a short task sends none): the step goes from
    /// `dispatched` straight to its outcome, and the result's output lines are logged and
    /// shown as the step's output, as a status's lines would have been.
    async fn on_result(
        &self,
        env: &Envelope,
        r: &WorkResult,
        publisher: &str,
    ) -> Result<(), EngineError> {
        let step = match self.inner.store.get_step(r.task_id).await {
            Ok(step) => step,
            Err(StoreError::NotFound { .. }) => {
                // The dry run of a step awaiting approval?
                if let Some(step) = self.inner.store.step_by_preview(r.task_id).await? {
                    return self.on_preview_result(step, r, publisher).await;
                }
                tracing::warn!(task = %r.task_id, "result for an unknown task ignored");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let active = [StepStatus::Dispatched, StepStatus::Running];
        let current = r.attempt == step.attempt && active.contains(&step.status);
        // An attempt bound to an agent's broker user takes results from that user only; one
        // bound to no one yet is bound to this publisher by the result's own write (no
        // write of its own).
        if let (true, Some(bound)) = (current, step.broker_user.as_deref()) {
            if bound != publisher {
                return Err(not_theirs(&step));
            }
        }
        if !current || !r.status.is_terminal() {
            self.duplicate_result(&step, r, publisher).await;
            return Ok(());
        }
        let now = Utc::now();
        let cancel_requested = step
            .error
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::TaskCancelled);
        let error = match r.status {
            TaskState::Completed => None,
            TaskState::Cancelled => Some(
                r.error
                    .clone()
                    .unwrap_or_else(|| ErrorPayload::new(ErrorCode::TaskCancelled, "cancelled")),
            ),
            _ => Some(r.error.clone().unwrap_or_else(|| {
                ErrorPayload::new(ErrorCode::ActionFailed, "the action failed")
            })),
        };
        let retry = matches!(r.status, TaskState::Failed)
            && !cancel_requested
            && error.as_ref().is_some_and(|e| e.code.is_transient())
            && step.attempt < self.inner.config.dispatch.max_attempts;
        // What an agent reports is stored and shown: strike configured secrets first (before
        // the tail is cut, so a secret across the cut is struck too).
        let redactor = &self.inner.config.redactor;
        let mut error = error;
        if let Some(e) = error.as_mut() {
            redactor.redact_error(e);
        }
        let output = redactor.redact(&r.output).into_owned();
        let mut patch = StepPatch {
            output: Some(tail(&output)),
            diff: r.diff.as_deref().map(|d| redactor.redact(d).into_owned()),
            changed: r.changed,
            error: error.clone(),
            agent_id: r.agent_id.clone(),
            reported_by: step.broker_user.is_none().then(|| publisher.to_string()),
            ..Default::default()
        };
        let to = if retry {
            let backoff = self.backoff(step.attempt);
            patch.not_before = Some(now + chrono_dur(backoff));
            patch.ready_at = Some(now);
            StepStatus::Ready
        } else {
            patch.finished_at = Some(now);
            patch.progress = (r.status == TaskState::Completed).then_some(100);
            match r.status {
                TaskState::Completed => StepStatus::Completed,
                TaskState::Cancelled => StepStatus::Cancelled,
                _ => StepStatus::Failed,
            }
        };
        // What the result records, built first: the step's change, its log lines and its
        // audit entry commit together (group-committed with other callers' writes).
        let mut lines = Vec::new();
        if step.status == StepStatus::Dispatched {
            // No status of this attempt came first, so none carried its lines: the result's
            // output holds them (a status racing this result may log some of them twice).
            for line in output.lines() {
                lines.push(NewLogLine {
                    request_id: step.request_id,
                    task_id: Some(step.task_id),
                    at: env.timestamp,
                    kind: "output".into(),
                    progress: None,
                    message: line.to_string(),
                });
            }
        }
        lines.push(NewLogLine {
            request_id: step.request_id,
            task_id: Some(step.task_id),
            at: env.timestamp,
            kind: "result".into(),
            progress: (to == StepStatus::Completed).then_some(100),
            message: match &error {
                None => format!(
                    "step {} ({}) completed in {:.2}s",
                    step.seq + 1,
                    step.action,
                    r.duration_seconds
                ),
                Some(e) => format!(
                    "step {} ({}) {}: {} {}",
                    step.seq + 1,
                    step.action,
                    r.status.as_str(),
                    e.code.code(),
                    e.message
                ),
            },
        });
        let mut details = json!({
            "task_id": step.task_id, "seq": step.seq, "action": step.action, "attempt": step.attempt,
            "agent_id": r.agent_id, "status": r.status, "duration_seconds": r.duration_seconds,
            "changed": r.changed, "resource_usage": r.resource_usage,
        });
        if let Some(e) = &error {
            details["code"] = json!(e.code.code());
            details["message"] = json!(e.message);
        }
        let event = if retry {
            AuditEvent::Retry
        } else {
            AuditEvent::StepResult
        };
        let audit = vec![NewAuditEntry {
            request_id: Some(step.request_id),
            actor: r.agent_id.clone().unwrap_or_else(|| "agent".into()),
            event,
            details,
        }];
        let write = GroupWrite::Step {
            task_id: step.task_id,
            from: active.to_vec(),
            to,
            patch: Box::new(patch),
            logs: lines,
            audit,
        };
        // A completed step moves its request on in the same transaction: its next step
        // becomes ready, or the request completes with its entry.
        let advance = to == StepStatus::Completed && !cancel_requested;
        let mut writes = vec![write];
        if advance {
            writes.push(GroupWrite::Advance {
                request_id: step.request_id,
                after_seq: step.seq,
                audit: vec![NewAuditEntry {
                    request_id: Some(step.request_id),
                    actor: "engine".into(),
                    event: AuditEvent::Completed,
                    details: json!({}),
                }],
            });
        }
        let mut slots = self.group_writes(writes).await.into_iter();
        let stored = slots
            .next()
            .unwrap_or_else(|| Err(StoreError::Corrupt("a result without its outcome".into())));
        let advanced = slots.next();
        match stored {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                // Another agent reported on this attempt first (it is bound to them), or
                // another copy of this result (or a timeout) got there first.
                let step = self.inner.store.get_step(step.task_id).await?;
                if step.attempt == r.attempt
                    && active.contains(&step.status)
                    && step.broker_user.as_deref().is_some_and(|b| b != publisher)
                {
                    return Err(not_theirs(&step));
                }
                self.duplicate_result(&step, r, publisher).await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.inner.metrics.results.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = step.dispatched_at {
            self.inner
                .metrics
                .observe_latency(((now - d).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0));
        }
        if step.status == StepStatus::Dispatched {
            for line in output.lines() {
                self.inner.events.publish(EngineEvent::Output {
                    request_id: step.request_id,
                    task_id: step.task_id,
                    seq: step.seq,
                    line: line.to_string(),
                    at: env.timestamp,
                });
            }
        }
        self.inner.events.publish(EngineEvent::Step {
            request_id: step.request_id,
            task_id: step.task_id,
            seq: step.seq,
            status: to,
            at: now,
        });
        if retry {
            self.inner.metrics.retries.fetch_add(1, Ordering::Relaxed);
            self.inner.wake.notify_one();
            return Ok(());
        }
        if cancel_requested || to == StepStatus::Cancelled {
            return self
                .end_request(
                    step.request_id,
                    RequestStatus::Cancelled,
                    Some(ErrorPayload::new(ErrorCode::RequestCancelled, "cancelled")),
                )
                .await;
        }
        if to == StepStatus::Failed {
            return self
                .end_request(step.request_id, RequestStatus::Failed, error)
                .await;
        }
        match advanced {
            Some(Ok(Written::Advanced(Some(done)))) => {
                self.ended(done);
                Ok(())
            }
            Some(Ok(_)) => {
                self.inner.wake.notify_one();
                Ok(())
            }
            // Not moved on with the result: the slower way, reading the steps.
            _ => self.promote_next(step.request_id).await,
        }
    }

    /// A result that is not applied: a copy of one already applied (a redelivery, an agent
    /// answering again from its ledger), or one of an attempt that ended otherwise or is not
    /// the step's current one. Counted and written to the audit log; the caller acks it.
    async fn duplicate_result(&self, step: &Step, r: &WorkResult, publisher: &str) {
        self.inner
            .metrics
            .duplicates
            .fetch_add(1, Ordering::Relaxed);
        let reason = if !r.status.is_terminal() {
            "not an outcome"
        } else if r.attempt < step.attempt {
            "an older attempt"
        } else if r.attempt > step.attempt {
            "an attempt never dispatched"
        } else {
            // Applied already, or the attempt timed out first: `step_status` tells.
            "the attempt already ended"
        };
        tracing::debug!(task = %r.task_id, attempt = r.attempt, reason, "duplicate result ignored");
        self.audit(vec![NewAuditEntry {
            request_id: Some(step.request_id),
            actor: format!("bus:{publisher}"),
            event: AuditEvent::DuplicateResult,
            details: json!({
                "task_id": step.task_id, "seq": step.seq, "attempt": r.attempt,
                "step_attempt": step.attempt, "step_status": step.status.as_str(),
                "status": r.status, "agent_id": r.agent_id, "reason": reason,
            }),
        }])
        .await;
    }

    /// Skips the steps that will never run and ends the request.
    async fn end_request(
        &self,
        id: Uuid,
        to: RequestStatus,
        error: Option<ErrorPayload>,
    ) -> Result<(), EngineError> {
        let steps = self.inner.store.steps(id).await?;
        let skip_to = if to == RequestStatus::Cancelled {
            StepStatus::Cancelled
        } else {
            StepStatus::Skipped
        };
        for s in steps
            .iter()
            .filter(|s| matches!(s.status, StepStatus::Pending | StepStatus::Ready))
        {
            let patch = StepPatch {
                finished_at: Some(Utc::now()),
                ..Default::default()
            };
            match self
                .inner
                .store
                .update_step(s.task_id, &[s.status], skip_to, &patch)
                .await
            {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.finish(id, None, to, error).await
    }

    /// The pause before a step's next attempt: the shared policy ([`crate::retry`]),
    /// starting at `retry_backoff`, at most a minute.
    fn backoff(&self, attempt: u32) -> Duration {
        crate::retry::Backoff {
            initial: self.inner.config.dispatch.retry_backoff,
            max: Duration::from_secs(60),
        }
        .delay(attempt)
    }

    /// Publishes what the outbox still holds after [`OUTBOX_AFTER`]: messages whose step is
    /// still `dispatched` with their attempt (a crash came between the commit and the
    /// publish, or the publish failed and the step could not be made ready again); the
    /// others are dropped. A copy of a message already delivered is recognised downstream
    /// (the agent's ledger answers a finished attempt again, the engine applies a result
    /// once).
    pub(super) async fn relay_outbox(&self) -> Result<(), EngineError> {
        let before = Utc::now() - chrono_dur(OUTBOX_AFTER);
        let due = self.inner.store.outbox_due(before, 100).await?;
        if due.is_empty() {
            return Ok(());
        }
        let mut done = Vec::with_capacity(due.len());
        for m in due {
            let live = match self.inner.store.get_step(m.task_id).await {
                Ok(step) => step.status == StepStatus::Dispatched && step.attempt == m.attempt,
                Err(StoreError::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            if !live {
                done.push(m.id);
                continue;
            }
            let env: Envelope = match serde_json::from_str(&m.body) {
                Ok(env) => env,
                Err(e) => {
                    tracing::error!(task = %m.task_id, error = %e, "an outbox message does not parse; dropped (the step's timeout retries it)");
                    done.push(m.id);
                    continue;
                }
            };
            match self.publish_to(&m.queue, &env).await {
                Ok(()) => {
                    tracing::warn!(task = %m.task_id, attempt = m.attempt, "published from the outbox (its first publish never happened)");
                    done.push(m.id);
                }
                Err(e) => {
                    tracing::warn!(task = %m.task_id, error = %e, "outbox publish failed; tried again later")
                }
            }
        }
        if !done.is_empty() {
            self.group_write(GroupWrite::Sent(done)).await?;
        }
        Ok(())
    }

    /// Publishes to a queue, declaring it first (once per process) so a direct exchange
    /// never drops the message for want of a binding.
    pub(super) async fn publish_to(
        &self,
        queue: &str,
        env: &Envelope,
    ) -> Result<(), TransportError> {
        let known = self
            .inner
            .declared
            .lock()
            .map(|s| s.contains(queue))
            .unwrap_or(false);
        if !known {
            self.inner.transport.declare_queue(queue).await?;
            if let Ok(mut s) = self.inner.declared.lock() {
                s.insert(queue.to_string());
            }
        }
        self.inner.transport.publish(queue, env).await
    }

    /// The outbox relay, timeouts, expired approvals, and requests interrupted between two
    /// writes.
    pub(super) async fn sweep(&self) -> Result<(), EngineError> {
        self.relay_outbox().await?;
        let now = Utc::now();
        for step in self.inner.store.overdue_steps(now, 100).await? {
            self.on_timeout(step, now).await?;
        }
        if let Some(expire) = self.inner.config.approval.expire_after {
            let filter = RequestFilter {
                status: Some(RequestStatus::AwaitingApproval),
                updated_before: Some(now - chrono_dur(expire)),
                limit: Some(100),
                ..Default::default()
            };
            for r in self.inner.store.list_requests(&filter).await? {
                let msg = format!("no approval within {} s", expire.as_secs());
                let patch = RequestPatch {
                    error: Some(ErrorPayload::new(ErrorCode::ApprovalExpired, msg.clone())),
                    audit: vec![NewAuditEntry {
                        request_id: Some(r.id),
                        actor: "policy:approval_timeout".into(),
                        event: AuditEvent::Rejected,
                        details: json!({ "reason": msg, "code": ErrorCode::ApprovalExpired.code() }),
                    }],
                    ..Default::default()
                };
                // A lost race (approved meanwhile) stores neither the change nor its entry.
                let _ = self
                    .set_status(
                        r.id,
                        RequestStatus::AwaitingApproval,
                        RequestStatus::Rejected,
                        patch,
                    )
                    .await;
            }
        }
        // Planning interrupted by a crash (or a lost instance): its lease lapsed, so plan it
        // again (a claim that was never made: after 5 minutes). Transitions are conditional,
        // and the lease keeps two instances from planning one request at once.
        for r in self
            .inner
            .store
            .planning_to_resume(now - STALE_PLANNING, 20)
            .await?
        {
            let engine = self.clone();
            self.inner
                .tasks
                .spawn(async move { engine.plan_request(r, false).await });
        }
        for status in [RequestStatus::Queued, RequestStatus::Running] {
            let filter = RequestFilter {
                status: Some(status),
                updated_before: Some(now - REPAIR_AFTER),
                limit: Some(50),
                ..Default::default()
            };
            for r in self.inner.store.list_requests(&filter).await? {
                self.reconcile(r.id).await?;
            }
        }
        Ok(())
    }

    /// Brings a queued/running request whose steps moved on back in line (e.g. after a crash
    /// between completing a step and promoting the next).
    async fn reconcile(&self, id: Uuid) -> Result<(), EngineError> {
        let steps = self.inner.store.steps(id).await?;
        if let Some(failed) = steps.iter().find(|s| s.status == StepStatus::Failed) {
            return self
                .end_request(id, RequestStatus::Failed, failed.error.clone())
                .await;
        }
        if steps.iter().any(|s| s.status == StepStatus::Cancelled)
            && !steps
                .iter()
                .any(|s| matches!(s.status, StepStatus::Dispatched | StepStatus::Running))
        {
            return self.end_request(id, RequestStatus::Cancelled, None).await;
        }
        self.promote_next(id).await
    }

    async fn on_timeout(&self, step: Step, now: DateTime<Utc>) -> Result<(), EngineError> {
        let active = [StepStatus::Dispatched, StepStatus::Running];
        let request = self.get_request(step.request_id).await?;
        let cancel_requested = step
            .error
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::TaskCancelled);
        // Tell the (possibly alive but silent) agent to stop, so the step never runs twice at once.
        let cancel = Envelope::new(
            request.trace_id.clone(),
            Some(request.id),
            Message::Cancel(Cancel {
                task_id: step.task_id,
                reason: Some("timed out".into()),
            }),
        );
        if let Err(e) = self.inner.transport.broadcast(&cancel).await {
            tracing::warn!(error = %e, "could not broadcast cancel for a timed-out step");
        }
        self.inner.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
        if cancel_requested {
            let patch = StepPatch {
                finished_at: Some(now),
                ..Default::default()
            };
            // The change and its entry in one transaction.
            let write = GroupWrite::Step {
                task_id: step.task_id,
                from: active.to_vec(),
                to: StepStatus::Cancelled,
                patch: Box::new(patch),
                logs: Vec::new(),
                audit: vec![NewAuditEntry {
                    request_id: Some(step.request_id),
                    actor: "engine".into(),
                    event: AuditEvent::CancelTimeout,
                    details: json!({ "task_id": step.task_id, "seq": step.seq }),
                }],
            };
            match self.group_write(write).await {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            return self
                .end_request(
                    step.request_id,
                    RequestStatus::Cancelled,
                    Some(ErrorPayload::new(
                        ErrorCode::RequestCancelled,
                        "cancelled (the agent did not confirm in time)",
                    )),
                )
                .await;
        }
        let error = ErrorPayload::new(
            ErrorCode::AgentTimeout,
            format!(
                "no result from {} within the step's timeout",
                step.queue.clone().unwrap_or_default()
            ),
        );
        let retry = step.attempt < self.inner.config.dispatch.max_attempts;
        let mut patch = StepPatch {
            error: Some(error.clone()),
            ..Default::default()
        };
        let to = if retry {
            patch.ready_at = Some(now);
            patch.not_before = Some(now + chrono_dur(self.backoff(step.attempt)));
            StepStatus::Ready
        } else {
            patch.finished_at = Some(now);
            StepStatus::Failed
        };
        // The change and its entry in one transaction.
        let write = GroupWrite::Step {
            task_id: step.task_id,
            from: active.to_vec(),
            to,
            patch: Box::new(patch),
            logs: Vec::new(),
            audit: vec![NewAuditEntry {
                request_id: Some(step.request_id),
                actor: "engine".into(),
                event: if retry {
                    AuditEvent::TimeoutRetry
                } else {
                    AuditEvent::Timeout
                },
                details: json!({ "task_id": step.task_id, "seq": step.seq, "attempt": step.attempt, "code": ErrorCode::AgentTimeout.code() }),
            }],
        };
        match self.group_write(write).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if retry {
            self.inner.metrics.retries.fetch_add(1, Ordering::Relaxed);
            self.inner.wake.notify_one();
            return Ok(());
        }
        self.end_request(step.request_id, RequestStatus::Failed, Some(error))
            .await
    }
}
