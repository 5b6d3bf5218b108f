//! The runner that hosts any [`Agent`]: consumes its queue, runs tasks concurrently up to a
//! limit, reports status and results, answers cancels, enforces deadlines, sends heartbeats,
//! and shuts down without losing work.
//!
//! Architecture invariants:
//! - A `work_request` is acked only after its `work_result` was confirmed by the broker, so
//!   a crash mid-task means redelivery, never loss.
//! - A redelivered request for a task id and attempt this runner already finished is not run
//!   again: the stored result is published again (a bounded cache, [`RunnerConfig::result_cache`]
//!   entries, evicted oldest first; after a restart or eviction, at-least-once applies).
//! - An unparsable or invalid message is answered with an `error` message on the results
//!   queue and dead-lettered; the runner keeps serving.
//! - A task sends no `work_status` before it has run [`RunnerConfig::status_delay`]: a short
//!   task is its `work_request` and its `work_result`, two messages, its output lines in the
//!   result's `output` (one status carries them just before the result when the output
//!   does not hold them all). No output line is lost either way.
//!
//! `work_result.resource_usage`: `wall_seconds` is measured by the runner around the
//! handler; `cpu_hours` and `memory_peak_gb` are what the handler reported through
//! [`TaskContext::record_child_usage`] for the child processes it ran (the Ansible executor
//! reaps its child with `wait4`: CPU of ansible and every worker it waited for, and the peak
//! RSS of the largest of those processes). A handler that runs no child reports 0 for both:
//! the agent's own threads are shared by concurrent tasks and are not attributed to any.
//!
//! Shutdown: the runner stops pulling deliveries at once; running tasks get
//! [`RunnerConfig::shutdown_grace`] to finish and report; the rest are cancelled (their
//! children killed) and their requests requeued without a result, for another agent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chiffon_core::transport::{ConsumeOptions, Delivery, Transport, TransportError};
use chiffon_protocol::{
    Envelope, ErrorCode, ErrorPayload, Heartbeat, Message, ResourceUsage, TaskState, WorkResult,
    WorkStatus,
};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::agent::{Agent, AgentError, TaskContext, TaskOutcome};
use crate::metrics::MetricsCollector;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Most lines in one `work_status`.
const LINES_PER_STATUS: usize = 200;
/// Most bytes of a result's `output`.
const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// Cancelled task ids remembered for requests that arrive after their cancel.
const CANCELLED_MEMORY: usize = 1024;

/// How a [`Runner`] behaves. `Default` gives sensible values for one host.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Unset: `{agent_type}-{hostname}-{8 hex}`.
    pub agent_id: Option<String>,
    pub hostname: String,
    /// Tasks run at once (and the queue's prefetch).
    pub max_concurrent: usize,
    pub heartbeat_interval: Duration,
    /// Deadline of a task whose request has no `timeout_seconds`.
    pub default_timeout: Duration,
    /// On shutdown, how long running tasks may finish before they are stopped and their
    /// requests requeued.
    pub shutdown_grace: Duration,
    /// After a cancel or deadline, how long a handler may take to return before it is dropped.
    pub cancel_grace: Duration,
    /// Finished results kept for redelivered requests.
    pub result_cache: usize,
    /// Output lines and progress are coalesced for this long into one `work_status`.
    pub status_batch: Duration,
    /// A task reports no `work_status` before it has run this long: one that finishes
    /// sooner costs two bus messages (its `work_request` and `work_result`), and its output
    /// lines travel in the result's `output` (or, when that does not hold them all, in one
    /// last status just before it). Past the delay the first status (`running`, with the
    /// lines and progress so far) goes out and statuses flow every [`Self::status_batch`].
    /// Keep it well below 10 s: the orchestrator says a step nobody has taken for that
    /// long is waiting. Zero: the first status goes out as the task starts.
    pub status_delay: Duration,
    /// Report GPUs (NVML) in heartbeats.
    pub gpu_metrics: bool,
    /// Where the durable ledger of finished attempts lives ([`crate::ledger`], one file per
    /// queue, `ledger-QUEUE.jsonl`): a request redelivered after this agent died past the
    /// side effect is answered from it, not run again. Unset: the in-memory cache only.
    pub ledger_dir: Option<std::path::PathBuf>,
    /// Broker users whose `work_request`s this agent runs (the orchestrator's). Empty: any
    /// authenticated publisher's. A request without an authenticated publisher (`user_id`)
    /// is never run. Other publishers' requests are dead-lettered with a 5009 error.
    pub orchestrator_users: Vec<String>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            agent_id: None,
            hostname: crate::metrics::hostname(),
            max_concurrent: 4,
            heartbeat_interval: Duration::from_secs(15),
            default_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            result_cache: 1024,
            status_batch: Duration::from_millis(100),
            status_delay: Duration::from_secs(1),
            gpu_metrics: true,
            orchestrator_users: Vec::new(),
            ledger_dir: None,
        }
    }
}

/// Errors that stop a [`Runner`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("invalid runner configuration: {0}")]
    Config(String),
}

impl RunnerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RunnerError::Transport(e) => e.code(),
            RunnerError::Config(_) => ErrorCode::InvalidConfig,
        }
    }
}

/// Hosts one agent on one queue. Build with [`Runner::new`], start with [`Runner::run`].
pub struct Runner<A: Agent> {
    transport: Arc<dyn Transport>,
    agent: Arc<A>,
    config: RunnerConfig,
    agent_id: String,
    queue: String,
}

impl<A: Agent> std::fmt::Debug for Runner<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("agent_id", &self.agent_id)
            .field("queue", &self.queue)
            .finish()
    }
}

struct Running {
    cancel: CancellationToken,
    cancel_requested: Arc<AtomicBool>,
}

#[derive(Default)]
struct ResultCache {
    map: HashMap<(Uuid, u32), Envelope>,
    order: VecDeque<(Uuid, u32)>,
}

struct Shared<A> {
    transport: Arc<dyn Transport>,
    agent: Arc<A>,
    config: RunnerConfig,
    agent_id: String,
    queue: String,
    results_queue: String,
    /// [`Agent::actions`], read once at start.
    actions: Vec<String>,
    action_set: HashSet<String>,
    running: Mutex<HashMap<Uuid, Running>>,
    done: Mutex<ResultCache>,
    ledger: Option<Arc<crate::ledger::Ledger>>,
    cancelled: Mutex<(HashSet<Uuid>, VecDeque<Uuid>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<A: Agent> Runner<A> {
    pub fn new(transport: Arc<dyn Transport>, agent: A, config: RunnerConfig) -> Self {
        let agent_id = config.agent_id.clone().unwrap_or_else(|| {
            let short = Uuid::new_v4().simple().to_string();
            format!("{}-{}-{}", agent.agent_type(), config.hostname, &short[..8])
        });
        let queue = agent.queue(transport.topology(), &config.hostname);
        Runner {
            transport,
            agent: Arc::new(agent),
            config,
            agent_id,
            queue,
        }
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The queue it consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Serves until `shutdown` is cancelled, then stops taking work, lets running tasks
    /// finish within [`RunnerConfig::shutdown_grace`] and requeues the ones that do not.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunnerError> {
        if self.config.max_concurrent == 0 || self.config.max_concurrent > usize::from(u16::MAX) {
            return Err(RunnerError::Config(
                "max_concurrent must be 1..=65535".into(),
            ));
        }
        let transport = self.transport.clone();
        // Only its own queue (with the work exchange and the dead-letter queue it needs):
        // the orchestrator declares the rest. So an agent's broker user needs no rights on
        // the orchestrator's queues (SECURITY.md lists the permissions).
        transport.declare_queue(&self.queue).await?;
        let control = transport.subscribe_control().await?;
        let prefetch = u16::try_from(self.config.max_concurrent).unwrap_or(u16::MAX);
        let mut consumer = transport
            .consume(&self.queue, ConsumeOptions { prefetch })
            .await?;
        // Results finished before a crash: answered again, never re-run.
        let mut done = ResultCache::default();
        let ledger = match &self.config.ledger_dir {
            Some(dir) => {
                let name: String = self
                    .queue
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = dir.join(format!("ledger-{name}.jsonl"));
                let (ledger, kept) =
                    crate::ledger::Ledger::open(&path, self.config.result_cache.max(1)).map_err(
                        |e| RunnerError::Config(format!("ledger {}: {e}", path.display())),
                    )?;
                for env in kept {
                    if let Message::WorkResult(r) = &env.body {
                        let key = (r.task_id, r.attempt);
                        if done.map.insert(key, env.clone()).is_none() {
                            done.order.push_back(key);
                        }
                    }
                }
                Some(Arc::new(ledger))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            ledger,
            results_queue: transport.topology().results_queue.clone(),
            actions: self.agent.actions(),
            action_set: self.agent.actions().into_iter().collect(),
            transport,
            agent: self.agent,
            config: self.config,
            agent_id: self.agent_id,
            queue: self.queue,
            running: Mutex::new(HashMap::new()),
            done: Mutex::new(done),
            cancelled: Mutex::new((HashSet::new(), VecDeque::new())),
        });
        tracing::info!(agent_id = %shared.agent_id, queue = %shared.queue, "runner started");

        let background = CancellationToken::new();
        let control_task = tokio::spawn(control_loop(shared.clone(), control, background.clone()));
        let heartbeat_task = tokio::spawn(heartbeat_loop(shared.clone(), background.clone()));

        let tasks = TaskTracker::new();
        let abandon = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(shared.config.max_concurrent));
        let mut result = Ok(());
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                d = consumer.next() => d,
            };
            match next {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    let abandon = abandon.clone();
                    tasks.spawn(async move {
                        handle_delivery(shared, delivery, abandon).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => {
                    result = Err(RunnerError::Transport(TransportError::Closed));
                    break;
                }
            }
        }

        tracing::info!(agent_id = %shared.agent_id, "runner stopping: no new work");
        tasks.close();
        if tokio::time::timeout(shared.config.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "tasks still running after the shutdown grace: stopping and requeueing them"
            );
            abandon.cancel();
            let _ = tokio::time::timeout(
                shared.config.cancel_grace + Duration::from_secs(5),
                tasks.wait(),
            )
            .await;
        }
        background.cancel();
        let _ = control_task.await;
        let _ = heartbeat_task.await;
        // Dropped last: unsettled deliveries still held go back to the queue.
        drop(consumer);
        tracing::info!(agent_id = %shared.agent_id, "runner stopped");
        result
    }
}

async fn control_loop<A: Agent>(
    shared: Arc<Shared<A>>,
    mut control: chiffon_core::transport::ControlStream,
    stop: CancellationToken,
) {
    loop {
        let env = tokio::select! {
            _ = stop.cancelled() => return,
            e = control.next() => match e { Some(e) => e, None => return },
        };
        let Message::Cancel(c) = &env.body else {
            continue;
        };
        {
            let mut cancelled = lock(&shared.cancelled);
            if cancelled.0.insert(c.task_id) {
                cancelled.1.push_back(c.task_id);
                if cancelled.1.len() > CANCELLED_MEMORY {
                    if let Some(old) = cancelled.1.pop_front() {
                        cancelled.0.remove(&old);
                    }
                }
            }
        }
        if let Some(r) = lock(&shared.running).get(&c.task_id) {
            tracing::info!(task_id = %c.task_id, "cancel requested");
            r.cancel_requested.store(true, Ordering::SeqCst);
            r.cancel.cancel();
        }
    }
}

async fn heartbeat_loop<A: Agent>(shared: Arc<Shared<A>>, stop: CancellationToken) {
    let collector = Arc::new(Mutex::new(MetricsCollector::new(shared.config.gpu_metrics)));
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = collector.clone();
        let Ok(m) = tokio::task::spawn_blocking(move || lock(&c).sample()).await else {
            continue;
        };
        let running = u32::try_from(lock(&shared.running).len()).unwrap_or(u32::MAX);
        let hb = Heartbeat {
            agent_id: shared.agent_id.clone(),
            agent_type: shared.agent.agent_type().to_string(),
            hostname: shared.config.hostname.clone(),
            cpu: Some(m.cpu),
            memory: Some(m.memory),
            gpus: m.gpus,
            running_tasks: running,
            max_tasks: u32::try_from(shared.config.max_concurrent).ok(),
            queue: Some(shared.queue.clone()),
            actions: shared.actions.clone(),
        };
        let env = Envelope::new(
            format!("heartbeat-{}", shared.agent_id),
            None,
            Message::Heartbeat(hb),
        );
        if let Err(e) = shared.transport.publish(&shared.results_queue, &env).await {
            tracing::warn!(error = %e, "heartbeat not published");
        }
    }
}

/// Best effort: the trace and request ids of a message that failed validation.
fn ids_of(body: &[u8]) -> (String, Option<Uuid>) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let trace = v
        .get("trace_id")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let request = v
        .get("request_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    (trace, request)
}

async fn reject<A: Agent>(shared: &Shared<A>, delivery: &Delivery, error: ErrorPayload) {
    let (trace, request) = ids_of(&delivery.body);
    tracing::warn!(code = %error.code, message = %error.message, "rejecting message: dead-lettered");
    let env = Envelope::new(trace, request, Message::Error(error));
    if let Err(e) = shared.transport.publish(&shared.results_queue, &env).await {
        tracing::warn!(error = %e, "could not publish the error reply");
    }
    if let Err(e) = delivery.dead_letter().await {
        tracing::warn!(error = %e, "could not dead-letter the message");
    }
}

async fn handle_delivery<A: Agent>(
    shared: Arc<Shared<A>>,
    delivery: Delivery,
    abandon: CancellationToken,
) {
    let env = match delivery.parse() {
        Ok(env) => env,
        Err(e) => return reject(&shared, &delivery, e.into()).await,
    };
    // Only the orchestrator may hand out work: an agent user (or anyone else who can publish
    // to the work exchange) must not be able to make another agent run something.
    let trusted = match delivery.publisher.as_deref() {
        Some(p) => {
            shared.config.orchestrator_users.is_empty()
                || shared.config.orchestrator_users.iter().any(|u| u == p)
        }
        None => false,
    };
    if !trusted {
        let err = ErrorPayload::new(
            ErrorCode::PublisherNotAllowed,
            match delivery.publisher.as_deref() {
                None => {
                    "work_request without an authenticated publisher (user_id): not run".to_string()
                }
                Some(p) => {
                    format!("work_request from broker user `{p}`, not the orchestrator: not run")
                }
            },
        );
        return reject(&shared, &delivery, err).await;
    }
    let work = match &env.body {
        Message::WorkRequest(w) => w.clone(),
        other => {
            let err = ErrorPayload::new(
                ErrorCode::InvalidField,
                format!(
                    "agent queue `{}` takes work_request messages, not {}",
                    shared.queue,
                    other.message_type()
                ),
            )
            .with_details(serde_json::json!({ "field": "message_type" }));
            return reject(&shared, &delivery, err).await;
        }
    };
    let key = (work.task_id, work.attempt);
    let cached = lock(&shared.done).map.get(&key).cloned();
    if let Some(result) = cached {
        tracing::info!(task_id = %work.task_id, attempt = work.attempt, "redelivered finished task: publishing its stored result again");
        return finish(&shared, &delivery, result, false).await;
    }
    if lock(&shared.running).contains_key(&work.task_id) {
        // The running copy will publish the result; this duplicate is settled.
        tracing::warn!(task_id = %work.task_id, "duplicate request for a task running here: acked");
        if let Err(e) = delivery.ack().await {
            tracing::warn!(error = %e, "ack failed");
        }
        return;
    }
    let started = Instant::now();
    let immediate = if !shared.action_set.contains(&work.action) {
        Some((
            TaskState::Failed,
            AgentError::ActionNotSupported(work.action.clone()).to_payload(),
        ))
    } else if lock(&shared.cancelled).0.contains(&work.task_id) {
        Some((
            TaskState::Cancelled,
            ErrorPayload::new(ErrorCode::TaskCancelled, "task cancelled before it started"),
        ))
    } else {
        None
    };
    if let Some((state, error)) = immediate {
        let result = WorkResult {
            task_id: work.task_id,
            status: state,
            output: String::new(),
            duration_seconds: 0.0,
            resource_usage: ResourceUsage::default(),
            error: Some(error),
            changed: None,
            diff: None,
            attempt: work.attempt,
            agent_id: Some(shared.agent_id.clone()),
        };
        let result = env.reply(Message::WorkResult(result));
        return finish(&shared, &delivery, result, true).await;
    }

    let timeout = work
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(shared.config.default_timeout);
    let deadline = Instant::now() + timeout;
    let ctx = TaskContext::new(
        work.task_id,
        env.request_id,
        env.trace_id.clone(),
        work.attempt,
        work.dry_run,
        deadline,
    );
    let cancel_requested = Arc::new(AtomicBool::new(false));
    lock(&shared.running).insert(
        work.task_id,
        Running {
            cancel: ctx.inner.cancel.clone(),
            cancel_requested: cancel_requested.clone(),
        },
    );
    // A cancel that raced with registration.
    if lock(&shared.cancelled).0.contains(&work.task_id) {
        cancel_requested.store(true, Ordering::SeqCst);
        ctx.inner.cancel.cancel();
    }
    // No status yet: a task that ends within `status_delay` reports with its result alone.
    let forwarder_stop = CancellationToken::new();
    let forwarder = tokio::spawn(status_forwarder(
        shared.clone(),
        env.clone(),
        ctx.clone(),
        forwarder_stop.clone(),
    ));

    let mut deadline_hit = false;
    let mut abandoned = false;
    let outcome = {
        // A panicking handler fails its task (executor_crashed) instead of leaving the
        // request unsettled until the runner restarts.
        let handler = std::panic::AssertUnwindSafe(shared.agent.handle(work.clone(), ctx.clone()))
            .catch_unwind();
        tokio::pin!(handler);
        let grace = shared.config.cancel_grace;
        let hard_stop = async {
            ctx.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(hard_stop);
        loop {
            tokio::select! {
                r = &mut handler => break r.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(task_id = %work.task_id, "handler panicked: {what}");
                    Err(AgentError::Crashed(std::io::Error::other(format!("handler panicked: {what}")).into()))
                }),
                _ = tokio::time::sleep_until(deadline.into()), if !deadline_hit => {
                    deadline_hit = true;
                    tracing::warn!(task_id = %work.task_id, "deadline reached: stopping the task");
                    ctx.inner.cancel.cancel();
                }
                _ = abandon.cancelled(), if !abandoned => {
                    abandoned = true;
                    ctx.inner.cancel.cancel();
                }
                _ = &mut hard_stop => {
                    tracing::warn!(task_id = %work.task_id, "handler ignored cancellation: dropped");
                    break Err(AgentError::Cancelled);
                }
            }
        }
    };
    forwarder_stop.cancel();
    // Awaited, so a first status racing with the end is either out or never sent.
    let status_sent = forwarder.await.unwrap_or(true);
    lock(&shared.running).remove(&work.task_id);

    if abandoned {
        tracing::warn!(task_id = %work.task_id, "shutdown: request requeued for another agent");
        if let Err(e) = delivery.requeue().await {
            tracing::warn!(error = %e, "requeue failed; the broker redelivers it when we disconnect");
        }
        return;
    }
    let snap = ctx.snapshot();
    let (status, output, changed, diff, error) = match outcome {
        Ok(TaskOutcome {
            output,
            changed,
            diff,
        }) => {
            let output = if output.is_empty() {
                snap.tail.join("\n")
            } else {
                output
            };
            (TaskState::Completed, output, changed, diff, None)
        }
        Err(e) => {
            let err = if deadline_hit {
                ErrorPayload::new(
                    ErrorCode::TaskDeadline,
                    format!(
                        "task ran past its deadline of {} s and was stopped",
                        timeout.as_secs()
                    ),
                )
            } else {
                e.to_payload()
            };
            let state = if !deadline_hit
                && cancel_requested.load(Ordering::SeqCst)
                && matches!(e, AgentError::Cancelled)
            {
                TaskState::Cancelled
            } else {
                TaskState::Failed
            };
            (state, snap.tail.join("\n"), None, None, Some(err))
        }
    };
    let output = cap(output, MAX_OUTPUT_BYTES);
    // Lines produced after the last status go out in one more status (the last one is part
    // of the result too), unless no status was sent and the result's output holds them all:
    // then the orchestrator logs them from the result, and a short task costs no status.
    if status_sent || !output_holds_pending(&ctx, &output) {
        flush_status(&shared, &env, &ctx, false).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let result = WorkResult {
        task_id: work.task_id,
        status,
        output,
        duration_seconds: wall,
        resource_usage: ResourceUsage {
            cpu_hours: snap.usage.cpu_seconds / 3600.0,
            memory_peak_gb: snap.usage.peak_rss_bytes as f64 / GIB,
            wall_seconds: Some(wall),
        },
        error,
        changed,
        diff,
        attempt: work.attempt,
        agent_id: Some(shared.agent_id.clone()),
    };
    tracing::info!(task_id = %work.task_id, status = status.as_str(), seconds = wall, "task finished");
    let result = env.reply(Message::WorkResult(result));
    finish(&shared, &delivery, result, true).await;
}

/// Publishes the result (retrying transient failures), remembers it, then acks the request.
async fn finish<A: Agent>(shared: &Shared<A>, delivery: &Delivery, result: Envelope, store: bool) {
    if store {
        if let Some(ledger) = &shared.ledger {
            // On disk before anyone can see the result: a crash from here on answers the
            // redelivered request from the ledger instead of running the step again.
            let (ledger, env) = (ledger.clone(), result.clone());
            match tokio::task::spawn_blocking(move || ledger.record(&env)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "result not written to the ledger"),
                Err(e) => tracing::error!(error = %e, "ledger task failed"),
            }
        }
        if let Message::WorkResult(r) = &result.body {
            let key = (r.task_id, r.attempt);
            let mut done = lock(&shared.done);
            if done.map.insert(key, result.clone()).is_none() {
                done.order.push_back(key);
            }
            while done.order.len() > shared.config.result_cache.max(1) {
                if let Some(old) = done.order.pop_front() {
                    done.map.remove(&old);
                }
            }
        }
    }
    crate::sys::failpoint("before_publish");
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=6 {
        match shared
            .transport
            .publish(&shared.results_queue, &result)
            .await
        {
            Ok(()) => {
                crate::sys::failpoint("before_ack");
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(error = %e, "ack failed: the request will be redelivered and answered from the result cache");
                }
                return;
            }
            Err(e) if e.is_transient() && attempt < 6 => {
                tracing::warn!(error = %e, attempt, "result not confirmed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, "result not published: requeueing the request (its result is cached)");
                let _ = delivery.requeue().await;
                return;
            }
        }
    }
}

async fn publish_status<A: Agent>(
    shared: &Shared<A>,
    env: &Envelope,
    task_id: Uuid,
    status: TaskState,
    progress: u32,
    message: String,
    lines: Vec<String>,
) {
    let msg = env.reply(Message::WorkStatus(WorkStatus {
        task_id,
        status,
        progress,
        message,
        metrics: None,
        lines,
        agent_id: Some(shared.agent_id.clone()),
        attempt: match &env.body {
            Message::WorkRequest(w) => Some(w.attempt),
            _ => None,
        },
    }));
    if let Err(e) = shared.transport.publish(&shared.results_queue, &msg).await {
        tracing::warn!(error = %e, "work_status not published");
    }
}

/// Whether `output` is exactly the lines waiting for a status (none dropped): a result
/// with that output carries them, and no status is needed for them.
fn output_holds_pending(ctx: &TaskContext, output: &str) -> bool {
    let s = ctx.lock();
    s.dropped == 0 && (s.pending.is_empty() || s.pending.join("\n") == output)
}

/// Sends what accumulated as `running` statuses (several when there are many lines);
/// `first`: the task's first status, sent even when nothing new accumulated.
async fn flush_status<A: Agent>(
    shared: &Shared<A>,
    env: &Envelope,
    ctx: &TaskContext,
    first: bool,
) {
    let mut force = first;
    loop {
        let (progress, message, lines) = {
            let mut s = ctx.lock();
            if !s.dirty && !force {
                return;
            }
            let mut lines: Vec<String> = if s.pending.len() > LINES_PER_STATUS {
                s.pending.drain(..LINES_PER_STATUS).collect()
            } else {
                std::mem::take(&mut s.pending)
            };
            if s.dropped > 0 {
                lines.insert(
                    0,
                    format!("… {} output lines dropped (agent buffer full)", s.dropped),
                );
                s.dropped = 0;
            }
            s.dirty = !s.pending.is_empty();
            let message = if force && s.message.is_empty() {
                format!("running on {}", shared.agent_id)
            } else {
                s.message.clone()
            };
            force = false;
            (s.progress, message, lines)
        };
        publish_status(
            shared,
            env,
            ctx.task_id(),
            TaskState::Running,
            progress,
            message,
            lines,
        )
        .await;
    }
}

/// A task's statuses: none before [`RunnerConfig::status_delay`], then the first one
/// (`running`, with the lines and progress so far), then each burst coalesced for
/// [`RunnerConfig::status_batch`]. Returns whether it sent any.
async fn status_forwarder<A: Agent>(
    shared: Arc<Shared<A>>,
    env: Envelope,
    ctx: TaskContext,
    stop: CancellationToken,
) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => return false,
        _ = tokio::time::sleep(shared.config.status_delay) => {}
    }
    flush_status(&shared, &env, &ctx, true).await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = ctx.inner.notify.notified() => {}
        }
        // Coalesce a burst of lines and progress into one message.
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep(shared.config.status_batch) => {}
        }
        flush_status(&shared, &env, &ctx, false).await;
    }
}

fn cap(mut s: String, max: usize) -> String {
    if s.len() > max {
        // Keep the end: the last lines say how it ended.
        let mut start = s.len() - max;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s = format!("…{}", &s[start..]);
    }
    s
}
