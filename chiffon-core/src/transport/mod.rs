//! The `Transport` trait: the message bus behind one mockable boundary.
//!
//! - [`amqp::AmqpTransport`] (feature `amqp`): RabbitMQ via lapin: one connection and a
//!   few channels per process, publisher confirms, persistent messages, manual acks, a
//!   prefetch limit, reconnection with backoff.
//! - [`memory::MemoryTransport`]: the in-process bus with the same semantics (ack, nack with
//!   requeue, redelivery of unacked messages when a consumer drops, dead-lettering,
//!   broadcasts), used by `chiffon up` and `chiffon run`.
//!
//! Both pass one conformance suite ([`conformance`], behind `test-utils`).

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "test-utils")]
pub mod conformance;
pub mod memory;

use async_trait::async_trait;
use futures::stream::BoxStream;

use chiffon_protocol::{Envelope, ErrorCode, ProtocolError};

/// The names of the bus's exchanges and queues. [`Topology::contract`] is CONTRACT.md's;
/// [`Topology::with_prefix`] gives tests their own names on a shared broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Direct, durable: `chiffon.work`.
    pub work_exchange: String,
    /// Fanout: `chiffon.control`.
    pub control_exchange: String,
    /// Dead letters: `chiffon.dead`.
    pub dead_letter_queue: String,
    /// `orchestrator.requests`.
    pub requests_queue: String,
    /// `orchestrator.results`.
    pub results_queue: String,
    /// Prefix of agent queues: `agent.`.
    pub agent_prefix: String,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::contract()
    }
}

impl Topology {
    /// The names of CONTRACT.md.
    pub fn contract() -> Self {
        Topology::with_prefix("")
    }

    /// Every name prefixed (`"t1234."` gives `t1234.chiffon.work`, …).
    pub fn with_prefix(prefix: &str) -> Self {
        Topology {
            work_exchange: format!("{prefix}chiffon.work"),
            control_exchange: format!("{prefix}chiffon.control"),
            dead_letter_queue: format!("{prefix}chiffon.dead"),
            requests_queue: format!("{prefix}orchestrator.requests"),
            results_queue: format!("{prefix}orchestrator.results"),
            agent_prefix: format!("{prefix}agent."),
        }
    }

    /// `agent.{agent_type}`, e.g. `agent.infrastructure`.
    pub fn agent_queue(&self, agent_type: &str) -> String {
        format!("{}{agent_type}", self.agent_prefix)
    }

    /// `agent.desktop.{hostname}`.
    pub fn desktop_queue(&self, hostname: &str) -> String {
        format!("{}desktop.{hostname}", self.agent_prefix)
    }

    /// The queues every deployment has: requests, results, `agent.infrastructure`.
    pub fn fixed_queues(&self) -> Vec<String> {
        vec![
            self.requests_queue.clone(),
            self.results_queue.clone(),
            self.agent_queue("infrastructure"),
        ]
    }
}

/// Errors of a [`Transport`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Not connected and could not reconnect (yet).
    #[error("bus unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The broker nacked the publish or the confirm never came.
    #[error("publish not confirmed: {0}")]
    NotConfirmed(String),
    #[error("no such queue `{0}`")]
    NoSuchQueue(String),
    #[error("transport closed")]
    Closed,
    #[error("bus error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TransportError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TransportError::NotConfirmed(_) => ErrorCode::PublishNotConfirmed,
            TransportError::NoSuchQueue(_) => ErrorCode::NotFound,
            _ => ErrorCode::BusUnavailable,
        }
    }

    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            TransportError::NoSuchQueue(_) | TransportError::Closed
        )
    }
}

/// Per-consumer options.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Most unacked deliveries held at once (AMQP prefetch).
    pub prefetch: u16,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions { prefetch: 32 }
    }
}

/// Settles one delivery. Implemented by each transport.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), TransportError>;
    /// `requeue = false` dead-letters the message to `chiffon.dead`.
    async fn nack(&self, requeue: bool) -> Result<(), TransportError>;
}

/// One message taken from a queue. Not settling it (dropping it, or dropping the consumer)
/// leaves it unacked: it is redelivered to another consumer once this one is gone.
pub struct Delivery {
    pub body: Vec<u8>,
    /// The broker delivered it before (to a consumer that did not settle it).
    pub redelivered: bool,
    /// Who published it, as the broker authenticated them: RabbitMQ's `user_id` property,
    /// which the broker refuses unless it equals the publishing connection's user; the
    /// publishing handle's identity on the in-process bus. `None`: the publisher did not
    /// say, and nothing vouches for it.
    pub publisher: Option<String>,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("bytes", &self.body.len())
            .field("redelivered", &self.redelivered)
            .field("publisher", &self.publisher)
            .finish()
    }
}

impl Delivery {
    /// Parses and validates the body.
    pub fn parse(&self) -> Result<Envelope, ProtocolError> {
        Envelope::parse(&self.body)
    }

    pub async fn ack(&self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Puts it back on its queue for another try.
    pub async fn requeue(&self) -> Result<(), TransportError> {
        self.acker.nack(true).await
    }

    /// Moves it to the dead-letter queue: never lost, never retried forever.
    pub async fn dead_letter(&self) -> Result<(), TransportError> {
        self.acker.nack(false).await
    }
}

/// A queue's deliveries, in order. Dropping it returns its unacked deliveries to the queue.
pub type Consumer = BoxStream<'static, Result<Delivery, TransportError>>;

/// Control broadcasts (`cancel`) as they arrive; each subscriber gets every one.
pub type ControlStream = BoxStream<'static, Envelope>;

/// The message bus. Object-safe: components hold an `Arc<dyn Transport>`.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// `amqp` or `memory`.
    fn backend(&self) -> &'static str;
    fn topology(&self) -> &Topology;
    /// Declares the exchanges, the dead-letter queue and the fixed queues. Idempotent.
    async fn declare_topology(&self) -> Result<(), TransportError>;
    /// Declares a durable queue bound to the work exchange with its own name as routing key,
    /// dead-lettering to the dead-letter queue. Idempotent.
    async fn declare_queue(&self, queue: &str) -> Result<(), TransportError>;
    /// Publishes a persistent message to the work exchange; returns once the broker
    /// confirmed it. Reconnects and retries (bounded) if the connection dropped.
    async fn publish(&self, routing_key: &str, envelope: &Envelope) -> Result<(), TransportError> {
        self.publish_bytes(routing_key, envelope.to_bytes()).await
    }
    /// Publishes raw bytes (for replies to garbage and for tests of it).
    async fn publish_bytes(&self, routing_key: &str, body: Vec<u8>) -> Result<(), TransportError>;
    /// Publishes to the control fanout: every subscriber gets it.
    async fn broadcast(&self, envelope: &Envelope) -> Result<(), TransportError>;
    /// Consumes a (declared) queue. The stream survives reconnects.
    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError>;
    /// Subscribes to control broadcasts from now on.
    async fn subscribe_control(&self) -> Result<ControlStream, TransportError>;
    /// Messages ready in a queue (not counting unacked ones).
    async fn queue_depth(&self, queue: &str) -> Result<u64, TransportError>;
    /// Whether the bus answers now.
    async fn health(&self) -> Result<(), TransportError>;
}
