//! # chiffon-agent-kit
//!
//! Everything an agent needs to serve Chiffon's bus, and the two agents Chiffon ships:
//!
//! - [`Agent`]: the one trait to implement for a new agent type: its type name, the
//!   actions it accepts, and an async handler that receives a `work_request` and a
//!   [`TaskContext`] (progress, output lines, cancellation, deadline).
//! - [`Runner`]: hosts any agent on a [`Transport`](chiffon_core::transport::Transport)
//!   (RabbitMQ or in-process): consumes `agent.{type}` (or `agent.desktop.{hostname}`), runs
//!   tasks concurrently up to a limit, publishes `work_status` (once a task has run
//!   [`RunnerConfig::status_delay`]: a short task sends only its `work_result`) and
//!   `work_result`, acks after the result is confirmed, answers `cancel`, enforces deadlines, sends heartbeats and shuts
//!   down without losing work.
//! - [`InfraAgent`] (`chiffon-infra-agent`): runs catalog playbooks with `ansible-playbook`.
//! - [`DesktopAgent`] (`chiffon-desktop-agent`): host and GPU metrics, local playbooks.
//!
//! A complete agent, served on the in-process bus (the template with more detail is
//! `examples/custom-agent` in the repository):
//!
//! ```
//! use std::sync::Arc;
//! use chiffon_agent_kit::{Agent, AgentError, Runner, RunnerConfig, TaskContext, TaskOutcome};
//! use chiffon_core::transport::{memory::MemoryTransport, ConsumeOptions, Topology, Transport};
//! use chiffon_protocol::{Envelope, Message, TaskState, WorkRequest};
//! use futures::StreamExt;
//!
//! struct Echo;
//!
//! impl Agent for Echo {
//!     fn agent_type(&self) -> &str { "echo" }
//!     fn actions(&self) -> Vec<String> { vec!["echo".into()] }
//!     async fn handle(&self, work: WorkRequest, ctx: TaskContext) -> Result<TaskOutcome, AgentError> {
//!         let text = work.parameters.get("text").and_then(|v| v.as_str())
//!             .ok_or_else(|| AgentError::InvalidParameters("`text` is required".into()))?;
//!         ctx.output_line(text);
//!         ctx.progress(100, "echoed");
//!         Ok(TaskOutcome::output(text))
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let bus: Arc<dyn Transport> = Arc::new(MemoryTransport::new(Topology::contract()));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let runner = Runner::new(bus.clone(), Echo, RunnerConfig::default());
//! let serving = tokio::spawn(runner.run(shutdown.clone()));
//!
//! // What the orchestrator does: publish a work_request, read orchestrator.results.
//! bus.declare_topology().await.unwrap();
//! let mut results = bus.consume("orchestrator.results", ConsumeOptions::default()).await.unwrap();
//! let work: WorkRequest = serde_json::from_value(serde_json::json!({
//!     "agent_type": "echo", "task_id": uuid::Uuid::new_v4(), "action": "echo",
//!     "parameters": {"text": "hello"}
//! })).unwrap();
//! bus.declare_queue("agent.echo").await.unwrap();
//! bus.publish("agent.echo", &Envelope::new("trace-1", None, Message::WorkRequest(work))).await.unwrap();
//! loop {
//!     let d = results.next().await.unwrap().unwrap();
//!     d.ack().await.unwrap();
//!     if let Message::WorkResult(r) = d.parse().unwrap().body {
//!         assert_eq!(r.status, TaskState::Completed);
//!         assert_eq!(r.output, "hello");
//!         break;
//!     }
//! }
//! shutdown.cancel();
//! serving.await.unwrap().unwrap();
//! # });
//! ```

pub mod agent;
pub mod ansible;
pub mod cli;
pub mod desktop;
pub mod infra;
pub mod ledger;
pub mod metrics;
pub mod runner;
mod sys;

pub use agent::{Agent, AgentError, ChildUsage, ContextSnapshot, TaskContext, TaskOutcome};
pub use ansible::{
    find_ansible_playbook, unsafe_extra_vars, AnsibleConfig, AnsibleExecutor, PlaybookRun,
};
pub use desktop::{DesktopAgent, DESKTOP_AGENT_TYPE, METRICS_SNAPSHOT};
pub use infra::{InfraAgent, InfraConfig, INFRA_AGENT_TYPE};
pub use metrics::{HostMetrics, MetricsCollector};
pub use runner::{Runner, RunnerConfig, RunnerError};
pub use sys::process_group_alive;
