//! The [`Agent`] trait a developer implements, the [`TaskContext`] a handler receives and
//! the [`TaskOutcome`]/[`AgentError`] it returns. Everything around a handler (queues,
//! acks, status messages, cancellation, deadlines, heartbeats) is the [`crate::Runner`]'s job.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chiffon_core::catalog::CatalogError;
use chiffon_core::transport::Topology;
use chiffon_protocol::{ErrorCode, ErrorPayload, WorkRequest};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One agent type: what it is called, what it accepts, and how it runs one task.
///
/// Handlers run concurrently (up to the runner's limit), so `handle` takes `&self`.
/// A handler should watch [`TaskContext::cancelled`] and return
/// [`AgentError::Cancelled`] promptly; a handler that ignores it is dropped after a grace
/// period.
pub trait Agent: Send + Sync + 'static {
    /// The agent type, as in `work_request.agent_type` (`infrastructure`, `desktop`, …).
    fn agent_type(&self) -> &str;

    /// The actions this agent accepts. Anything else is answered with
    /// `action_not_supported` (5404) without calling [`Agent::handle`]. The runner reads it
    /// once, when it starts.
    fn actions(&self) -> Vec<String>;

    /// The queue this agent consumes: `agent.{type}` by default; a per-host agent returns
    /// `topology.desktop_queue(hostname)`.
    fn queue(&self, topology: &Topology, hostname: &str) -> String {
        let _ = hostname;
        topology.agent_queue(self.agent_type())
    }

    /// Runs one task.
    fn handle(
        &self,
        work: WorkRequest,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<TaskOutcome, AgentError>> + Send;
}

/// What a successful task produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskOutcome {
    /// The result's `output`. Empty: the runner uses the tail of the streamed output lines.
    pub output: String,
    /// Whether the action changed anything (Ansible's `changed`).
    pub changed: Option<bool>,
    /// The diff of a dry (check-mode) run.
    pub diff: Option<String>,
}

impl TaskOutcome {
    pub fn output(output: impl Into<String>) -> Self {
        TaskOutcome {
            output: output.into(),
            ..Default::default()
        }
    }
}

/// Why a task did not complete. Each variant maps to an [`ErrorCode`] via [`AgentError::code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("action `{0}` is not supported by this agent")]
    ActionNotSupported(String),
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    #[error("ansible-playbook not found ({searched}); run scripts/ansible.sh or `pip install ansible-core`, or set CHIFFON_ANSIBLE_PLAYBOOK")]
    AnsibleMissing { searched: String },
    #[error("action failed: {message}")]
    ActionFailed { message: String, details: Value },
    #[error("task cancelled")]
    Cancelled,
    #[error("invalid catalog: {0}")]
    Catalog(#[source] CatalogError),
    #[error("executor crashed: {0}")]
    Crashed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl AgentError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::ActionNotSupported(_) => ErrorCode::ActionNotSupported,
            AgentError::InvalidParameters(_) => ErrorCode::InvalidParameters,
            AgentError::AnsibleMissing { .. } => ErrorCode::AnsibleMissing,
            AgentError::ActionFailed { .. } => ErrorCode::ActionFailed,
            AgentError::Cancelled => ErrorCode::TaskCancelled,
            AgentError::Catalog(e) => match e {
                CatalogError::InvalidParameter { .. } => ErrorCode::InvalidParameters,
                CatalogError::UnknownAction(_) => ErrorCode::ActionNotSupported,
                _ => ErrorCode::InvalidCatalog,
            },
            AgentError::Crashed(_) => ErrorCode::ExecutorCrashed,
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        AgentError::ActionFailed {
            message: message.into(),
            details: Value::Object(Default::default()),
        }
    }

    /// The `error` payload of the `work_result`.
    pub fn to_payload(&self) -> ErrorPayload {
        let p = ErrorPayload::new(self.code(), self.to_string());
        match self {
            AgentError::ActionFailed { details, .. } => p.with_details(details.clone()),
            _ => p,
        }
    }
}

/// Most output lines kept for the result's tail.
pub const TAIL_LINES: usize = 200;
/// Most bytes of one output line (longer lines are cut).
pub const MAX_LINE_BYTES: usize = 4096;
/// Most lines waiting for the next `work_status`; older ones are dropped (and counted).
pub const MAX_PENDING_LINES: usize = 1000;

/// CPU time and peak memory of the child processes a task ran.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChildUsage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct CtxState {
    pub progress: u32,
    pub message: String,
    pub pending: Vec<String>,
    pub dropped: u64,
    pub tail: VecDeque<String>,
    pub usage: ChildUsage,
    pub dirty: bool,
}

#[derive(Debug)]
pub(crate) struct CtxInner {
    pub task_id: Uuid,
    pub request_id: Option<Uuid>,
    pub trace_id: String,
    pub attempt: u32,
    pub dry_run: bool,
    pub deadline: Instant,
    pub cancel: CancellationToken,
    pub state: Mutex<CtxState>,
    pub notify: Notify,
}

/// A running task's handle to the runner: progress, output, cancellation, deadline.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub(crate) inner: Arc<CtxInner>,
}

impl TaskContext {
    /// A context not attached to a runner (for calling a handler directly, e.g. in tests):
    /// progress and lines are recorded and can be read back with [`TaskContext::snapshot`].
    pub fn detached(task_id: Uuid, dry_run: bool, deadline: Instant) -> Self {
        TaskContext::new(task_id, None, String::new(), 1, dry_run, deadline)
    }

    pub(crate) fn new(
        task_id: Uuid,
        request_id: Option<Uuid>,
        trace_id: String,
        attempt: u32,
        dry_run: bool,
        deadline: Instant,
    ) -> Self {
        TaskContext {
            inner: Arc::new(CtxInner {
                task_id,
                request_id,
                trace_id,
                attempt,
                dry_run,
                deadline,
                cancel: CancellationToken::new(),
                state: Mutex::new(CtxState::default()),
                notify: Notify::new(),
            }),
        }
    }

    pub fn task_id(&self) -> Uuid {
        self.inner.task_id
    }

    pub fn request_id(&self) -> Option<Uuid> {
        self.inner.request_id
    }

    pub fn trace_id(&self) -> &str {
        &self.inner.trace_id
    }

    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Check mode: report what would change, change nothing.
    pub fn dry_run(&self) -> bool {
        self.inner.dry_run
    }

    /// When the runner stops the task (it cancels the token then).
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// Cancelled on a `cancel` message, at the deadline, or when the runner gives up.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when the task should stop.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Reports progress (0-100, clamped; progress never goes backwards) and a message.
    pub fn progress(&self, pct: u32, message: impl Into<String>) {
        {
            let mut s = self.lock();
            s.progress = s.progress.max(pct.min(100));
            s.message = message.into();
            s.dirty = true;
        }
        self.inner.notify.notify_one();
    }

    /// Streams one output line; lines are batched into `work_status.lines`.
    pub fn output_line(&self, line: impl Into<String>) {
        let mut line: String = line.into();
        if line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        {
            let mut s = self.lock();
            if s.pending.len() >= MAX_PENDING_LINES {
                s.pending.remove(0);
                s.dropped += 1;
            }
            s.pending.push(line.clone());
            if s.tail.len() >= TAIL_LINES {
                s.tail.pop_front();
            }
            s.tail.push_back(line);
            s.dirty = true;
        }
        self.inner.notify.notify_one();
    }

    /// Adds the CPU time and peak memory of a child process the task ran.
    pub fn record_child_usage(&self, usage: ChildUsage) {
        let mut s = self.lock();
        s.usage.cpu_seconds += usage.cpu_seconds;
        s.usage.peak_rss_bytes = s.usage.peak_rss_bytes.max(usage.peak_rss_bytes);
    }

    /// Progress, message, the output tail and child usage recorded so far.
    pub fn snapshot(&self) -> ContextSnapshot {
        let s = self.lock();
        ContextSnapshot {
            progress: s.progress,
            message: s.message.clone(),
            tail: s.tail.iter().cloned().collect(),
            usage: s.usage,
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, CtxState> {
        // A panic while holding this lock cannot leave the state inconsistent (plain data).
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A copy of a context's state.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextSnapshot {
    pub progress: u32,
    pub message: String,
    pub tail: Vec<String>,
    pub usage: ChildUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_never_goes_back_and_output_is_bounded() {
        let ctx = TaskContext::detached(Uuid::new_v4(), false, Instant::now());
        ctx.progress(40, "a");
        ctx.progress(10, "b");
        ctx.progress(500, "c");
        assert_eq!(ctx.snapshot().progress, 100);
        for i in 0..(MAX_PENDING_LINES + 10) {
            ctx.output_line(format!("line {i}"));
        }
        ctx.output_line("x".repeat(MAX_LINE_BYTES * 2));
        let s = ctx.lock();
        assert_eq!(s.pending.len(), MAX_PENDING_LINES);
        assert_eq!(s.dropped, 11);
        assert_eq!(s.tail.len(), TAIL_LINES);
        assert!(s.tail.back().unwrap().len() <= MAX_LINE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(AgentError::Cancelled.code(), ErrorCode::TaskCancelled);
        assert_eq!(
            AgentError::ActionNotSupported("x".into()).code(),
            ErrorCode::ActionNotSupported
        );
        let e = AgentError::AnsibleMissing {
            searched: "$PATH".into(),
        };
        assert_eq!(e.to_payload().code, ErrorCode::AnsibleMissing);
        assert!(e.to_string().contains("pip install ansible-core"));
    }
}
