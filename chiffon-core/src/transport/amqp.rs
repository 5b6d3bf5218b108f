//! The RabbitMQ bus (lapin): the production [`Transport`].
//!
//! Topology, exactly CONTRACT.md's (names from [`Topology`]):
//! - `chiffon.work`: direct, durable. Every work queue (`orchestrator.requests`,
//!   `orchestrator.results`, `agent.infrastructure`, `agent.desktop.{host}`) is bound to it
//!   with its own name as routing key.
//! - Work queues are durable **classic** queues, not quorum queues: with publisher confirms
//!   on this kind of machine classic queues were several times faster, and a single-node
//!   broker gains nothing from quorum replication. Each carries
//!   `x-dead-letter-exchange: ""` and `x-dead-letter-routing-key: chiffon.dead`, so a
//!   message nacked without requeue lands in the durable `chiffon.dead` queue.
//! - `chiffon.control`: fanout, durable. Each [`Transport::subscribe_control`] gets its own
//!   exclusive, auto-deleted, server-named queue bound to it.
//!
//! [`Transport::declare_queue`] also declares the work exchange and `chiffon.dead`, and
//! [`Transport::subscribe_control`] the control exchange, so neither depends on
//! [`Transport::declare_topology`] having run; [`Transport::broadcast`] does (RabbitMQ
//! refuses a publish to a missing exchange: a [`TransportError::Backend`] error).
//!
//! Messages are persistent (`delivery_mode` 2), `application/json`, carry a `message_id`
//! (the envelope's, or a fresh uuid for raw bytes) and `type` (the message type), and every
//! publish waits for the broker's confirm; a nack is [`TransportError::NotConfirmed`].
//! Consumers settle explicitly, with a prefetch limit (0 is read as 1: RabbitMQ would read
//! it as unlimited). Settling twice is an error; settling after the consumer's channel
//! closed is [`TransportError::Unavailable`], and the broker redelivers that message.
//!
//! Resources: one connection per transport (clones share it), one confirm-mode channel for
//! all publishes (lapin pipelines concurrent publishes on it; each caller waits for its own
//! confirm), one channel for declarations and depth checks, and one channel per consumer.
//!
//! Reconnection: when the connection drops (broker restart, `rabbitmqctl close_connection`),
//! the next operation reconnects, with exponential backoff, for up to
//! [`AmqpOptions::retry_window`]; after a reconnect the topology and every queue declared
//! through this transport are declared again. A publish returns only once a broker
//! confirmed it, so nothing it reported as published is lost; a publish interrupted before
//! its confirm is sent again, so delivery is at least once (receivers deduplicate by
//! `message_id` where it matters). Consumer streams re-consume after a reconnect and keep
//! going; deliveries unsettled at the drop are redelivered by the broker.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
};
use tokio::time::Instant;

use chiffon_protocol::Envelope;

use super::memory::check_queue_name;
use super::{
    Acker, ConsumeOptions, Consumer, ControlStream, Delivery, Topology, Transport, TransportError,
};

/// How an [`AmqpTransport`] connects and retries.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// The `connection_name` client property, shown by `rabbitmqctl list_connections
    /// client_properties` and the management UI.
    pub connection_name: String,
    /// How long an operation keeps reconnecting and retrying before it fails with
    /// [`TransportError::Unavailable`], and how long a publish waits for its confirm.
    pub retry_window: Duration,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            connection_name: format!("chiffon-{}", std::process::id()),
            retry_window: Duration::from_secs(30),
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The largest frame this client asks for, unless the URL says otherwise (`?frame_max=`).
/// lapin keeps a send and a receive buffer of 32 frames per connection, so RabbitMQ's
/// default of 128 KiB costs 8 MiB a connection, all of it resident once the ring buffers
/// have gone round; 32 KiB costs 2 MiB. Chiffon's messages are a few KiB; a larger one
/// travels in several frames.
const FRAME_MAX: u32 = 32 * 1024;

/// Connects to `url`, asking for frames of at most `FRAME_MAX` unless it names its own.
async fn open_connection(
    url: &str,
    props: ConnectionProperties,
) -> Result<Connection, lapin::Error> {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(uri, props).await
        }
        // lapin reports the URL's error itself, as it always has.
        Err(_) => Connection::connect(url, props).await,
    }
}

/// The RabbitMQ [`Transport`]. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("topology", &self.shared.topology)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

struct Shared {
    url: String,
    /// The broker user of `url`: every publish carries it as `user_id`, which RabbitMQ
    /// checks against the connection's user, so consumers know who published.
    user: String,
    topology: Topology,
    options: AmqpOptions,
    /// The live connection; replaced (under this lock, so by one task) when it drops.
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Whether [`Transport::declare_topology`] ran: a reconnect declares it again.
    topology_declared: AtomicBool,
    /// Queues declared through [`Transport::declare_queue`]: a reconnect declares them again.
    queues: Mutex<BTreeSet<String>>,
    closed: AtomicBool,
}

/// One connection and its shared channels.
struct Link {
    connection: Connection,
    /// Confirm mode; recreated when a channel error closed it.
    publish: Mutex<Option<Channel>>,
    /// Declarations, deletions and passive checks, one at a time: a failed passive declare
    /// closes its channel, which must not fail an unrelated operation sharing it.
    admin: tokio::sync::Mutex<Option<Channel>>,
}

/// What an attempt's failure means for the retry loop.
enum Failure {
    /// The connection or channel went away: reconnect and try again.
    Retry(lapin::Error),
    /// Retrying will not help.
    Fatal(TransportError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sorts a lapin error: connection-level trouble is retried, channel-level refusals
/// (404, 406, 403, …) are answers. `queue` names the queue a 404 is about, if any.
fn classify(error: lapin::Error, queue: Option<&str>) -> Failure {
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => match queue {
                Some(q) => Failure::Fatal(TransportError::NoSuchQueue(q.to_owned())),
                None => Failure::Fatal(TransportError::Backend(Box::new(error))),
            },
            AMQPErrorKind::Soft(_) => Failure::Fatal(TransportError::Backend(Box::new(error))),
            AMQPErrorKind::Hard(_) => Failure::Retry(error),
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError => Failure::Retry(error),
        _ => Failure::Fatal(TransportError::Backend(Box::new(error))),
    }
}

fn retry(error: lapin::Error) -> Failure {
    classify(error, None)
}

impl Link {
    async fn publish_channel(&self) -> lapin::Result<Channel> {
        if let Some(ch) = lock(&self.publish)
            .as_ref()
            .filter(|c| c.status().connected())
        {
            return Ok(ch.clone());
        }
        let ch = self.connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        // Two tasks may race here; the loser's channel closes when dropped.
        *lock(&self.publish) = Some(ch.clone());
        Ok(ch)
    }

    /// Runs `op` on the admin channel, serialised with other admin operations.
    async fn with_admin<T, F, Fut>(&self, op: F) -> Result<T, Failure>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut slot = self.admin.lock().await;
        let ch = match slot.as_ref().filter(|c| c.status().connected()) {
            Some(ch) => ch.clone(),
            None => {
                let ch = self.connection.create_channel().await.map_err(retry)?;
                *slot = Some(ch.clone());
                ch
            }
        };
        op(ch).await
    }
}

fn work_queue_arguments(topology: &Topology) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(topology.dead_letter_queue.as_str().into()),
    );
    args
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// The work exchange and the dead-letter queue: what every work queue needs first.
async fn declare_base(ch: &Channel, topology: &Topology) -> Result<(), Failure> {
    ch.exchange_declare(
        topology.work_exchange.as_str().into(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .map_err(retry)?;
    ch.queue_declare(
        topology.dead_letter_queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .map_err(retry)?;
    Ok(())
}

async fn declare_control_exchange(ch: &Channel, topology: &Topology) -> Result<(), Failure> {
    ch.exchange_declare(
        topology.control_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .map_err(retry)
}

async fn declare_work_queue(ch: &Channel, topology: &Topology, queue: &str) -> Result<(), Failure> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        work_queue_arguments(topology),
    )
    .await
    .map_err(retry)?;
    ch.queue_bind(
        queue.into(),
        topology.work_exchange.as_str().into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(retry)
}

async fn declare_everything(
    ch: &Channel,
    topology: &Topology,
    with_topology: bool,
    queues: &[String],
) -> Result<(), Failure> {
    declare_base(ch, topology).await?;
    let mut all: Vec<String> = queues.to_vec();
    if with_topology {
        declare_control_exchange(ch, topology).await?;
        all.extend(topology.fixed_queues());
    }
    for queue in &all {
        declare_work_queue(ch, topology, queue).await?;
    }
    Ok(())
}

impl AmqpTransport {
    /// Connects to the broker at `url` (`amqp://user:pass@host:5672/%2f`) with default
    /// options. Fails at once with [`TransportError::Unavailable`] if it cannot connect:
    /// retrying is for a bus that was there and went away.
    pub async fn connect(url: &str, topology: Topology) -> Result<Self, TransportError> {
        AmqpTransport::connect_with_options(url, topology, AmqpOptions::default()).await
    }

    pub async fn connect_with_options(
        url: &str,
        topology: Topology,
        options: AmqpOptions,
    ) -> Result<Self, TransportError> {
        let user = url
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.authority.userinfo.username)
            .map_err(|e| TransportError::Unavailable(format!("invalid AMQP URL: {e}").into()))?;
        let transport = AmqpTransport {
            shared: Arc::new(Shared {
                url: url.to_owned(),
                user,
                topology,
                options,
                link: tokio::sync::Mutex::new(None),
                topology_declared: AtomicBool::new(false),
                queues: Mutex::new(BTreeSet::new()),
                closed: AtomicBool::new(false),
            }),
        };
        match transport.link().await {
            Ok(_) => Ok(transport),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Retry(e)) => Err(TransportError::Unavailable(Box::new(e))),
        }
    }

    /// The broker user this transport publishes as (the `user_id` of its messages).
    pub fn user(&self) -> &str {
        &self.shared.user
    }

    /// The `connection_name` this transport's connection shows on the broker.
    pub fn connection_name(&self) -> &str {
        &self.shared.options.connection_name
    }

    /// Closes the connection; later calls fail with [`TransportError::Closed`] and consumer
    /// streams end. Unsettled deliveries go back to their queues.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(link) = self.shared.link.lock().await.take() {
            if let Err(e) = link.connection.close(200, "closing".into()).await {
                tracing::debug!(error = %e, "amqp: close");
            }
        }
    }

    /// Deletes this transport's exchanges and queues (the topology's and those declared
    /// through it): test clean-up on a shared broker.
    #[cfg(feature = "test-utils")]
    pub async fn delete_topology(&self) -> Result<(), TransportError> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let t = self.shared.topology.clone();
        let mut queues: Vec<String> = lock(&self.shared.queues).iter().cloned().collect();
        queues.extend(t.fixed_queues());
        queues.push(t.dead_letter_queue.clone());
        let exchanges = [t.work_exchange.clone(), t.control_exchange.clone()];
        self.retrying(|link| {
            let queues = queues.clone();
            let exchanges = exchanges.clone();
            async move {
                link.with_admin(|ch| async move {
                    for q in &queues {
                        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                            .map_err(retry)?;
                    }
                    for x in &exchanges {
                        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await
                            .map_err(retry)?;
                    }
                    Ok(())
                })
                .await
            }
        })
        .await?;
        lock(&self.shared.queues).clear();
        self.shared.topology_declared.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The live connection, reconnecting (one attempt) if it dropped.
    async fn link(&self) -> Result<Arc<Link>, Failure> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(Failure::Fatal(TransportError::Closed));
        }
        let mut slot = self.shared.link.lock().await;
        if let Some(link) = slot.as_ref() {
            if link.connection.status().connected() {
                return Ok(link.clone());
            }
            tracing::warn!(
                connection = %self.shared.options.connection_name,
                "amqp: connection lost, reconnecting"
            );
        }
        *slot = None;
        let props = ConnectionProperties::default()
            .with_connection_name(self.shared.options.connection_name.as_str().into());
        let connection =
            match tokio::time::timeout(CONNECT_TIMEOUT, open_connection(&self.shared.url, props))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(Failure::Retry(e)),
                Err(_) => {
                    return Err(Failure::Fatal(TransportError::Unavailable(
                        format!(
                            "no answer from the broker in {}s",
                            CONNECT_TIMEOUT.as_secs()
                        )
                        .into(),
                    )))
                }
            };
        let link = Arc::new(Link {
            connection,
            publish: Mutex::new(None),
            admin: tokio::sync::Mutex::new(None),
        });
        // A broker that lost its state (reset, new node) gets our topology back before
        // anyone publishes into the void.
        let with_topology = self.shared.topology_declared.load(Ordering::SeqCst);
        let queues: Vec<String> = lock(&self.shared.queues).iter().cloned().collect();
        if with_topology || !queues.is_empty() {
            let topology = &self.shared.topology;
            link.with_admin(|ch| async move {
                declare_everything(&ch, topology, with_topology, &queues).await
            })
            .await?;
        }
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Runs `op` until it succeeds, fails for good, or the retry window passes,
    /// reconnecting with exponential backoff in between.
    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, TransportError>
    where
        F: FnMut(Arc<Link>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + self.shared.options.retry_window;
        let mut delay = FIRST_BACKOFF;
        loop {
            let attempt = match self.link().await {
                Ok(link) => op(link).await,
                Err(f) => Err(f),
            };
            let error = match attempt {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => e,
            };
            if Instant::now() + delay > deadline {
                return Err(TransportError::Unavailable(Box::new(error)));
            }
            tracing::warn!(error = %error, retry_in = ?delay, "amqp: retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let confirm_wait = self.shared.options.retry_window;
        let body = &body;
        let properties = &properties;
        self.retrying(|link| async move {
            let ch = link.publish_channel().await.map_err(retry)?;
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .await
                .map_err(retry)?;
            match tokio::time::timeout(confirm_wait, confirm).await {
                Err(_) => Err(Failure::Fatal(TransportError::NotConfirmed(format!(
                    "no confirm within {}s",
                    confirm_wait.as_secs()
                )))),
                Ok(Err(e)) => Err(retry(e)),
                Ok(Ok(Confirmation::Ack(_))) => Ok(()),
                Ok(Ok(Confirmation::Nack(_))) => Err(Failure::Fatal(TransportError::NotConfirmed(
                    "the broker nacked the message".into(),
                ))),
                Ok(Ok(Confirmation::NotRequested)) => Err(Failure::Fatal(
                    TransportError::NotConfirmed("confirms are off on the channel".into()),
                )),
            }
        })
        .await
    }

    /// Opens a channel consuming `queue` with `prefetch`, after checking it exists.
    async fn open_consumer(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer), TransportError> {
        self.retrying(|link| async move {
            let ch = link.connection.create_channel().await.map_err(retry)?;
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(e, Some(queue)))?;
            ch.basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(retry)?;
            let consumer = ch
                .basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(e, Some(queue)))?;
            Ok((ch, consumer))
        })
        .await
    }

    /// A fresh exclusive queue bound to the control fanout, consumed without acks
    /// (a cancel missed while disconnected is not replayed: the engine re-sends).
    async fn open_control(&self) -> Result<(Channel, lapin::Consumer), TransportError> {
        let topology = &self.shared.topology;
        self.retrying(|link| async move {
            let ch = link.connection.create_channel().await.map_err(retry)?;
            declare_control_exchange(&ch, topology).await?;
            let queue = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions::exclusive().auto_delete(),
                    FieldTable::default(),
                )
                .await
                .map_err(retry)?;
            ch.queue_bind(
                queue.name().clone(),
                topology.control_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(retry)?;
            let consumer = ch
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(retry)?;
            Ok((ch, consumer))
        })
        .await
    }
}

fn properties(user: &str, message_id: String, message_type: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_user_id(user.into());
    match message_type {
        Some(t) => props.with_type(t.into()),
        None => props,
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn backend(&self) -> &'static str {
        "amqp"
    }

    fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    async fn declare_topology(&self) -> Result<(), TransportError> {
        let topology = &self.shared.topology;
        self.retrying(|link| async move {
            link.with_admin(|ch| async move { declare_everything(&ch, topology, true, &[]).await })
                .await
        })
        .await?;
        self.shared.topology_declared.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn declare_queue(&self, queue: &str) -> Result<(), TransportError> {
        check_queue_name(queue)?;
        let topology = &self.shared.topology;
        if queue == topology.dead_letter_queue {
            return Err(TransportError::Backend(
                format!("`{queue}` is the dead-letter queue, not a work queue").into(),
            ));
        }
        self.retrying(|link| async move {
            link.with_admin(|ch| async move {
                declare_base(&ch, topology).await?;
                declare_work_queue(&ch, topology, queue).await
            })
            .await
        })
        .await?;
        lock(&self.shared.queues).insert(queue.to_owned());
        Ok(())
    }

    async fn publish(&self, routing_key: &str, envelope: &Envelope) -> Result<(), TransportError> {
        let props = properties(
            &self.shared.user,
            envelope.message_id.to_string(),
            Some(envelope.message_type()),
        );
        let exchange = &self.shared.topology.work_exchange;
        self.publish_to(exchange, routing_key, envelope.to_bytes(), props)
            .await
    }

    async fn publish_bytes(&self, routing_key: &str, body: Vec<u8>) -> Result<(), TransportError> {
        let props = properties(&self.shared.user, uuid::Uuid::new_v4().to_string(), None);
        let exchange = &self.shared.topology.work_exchange;
        self.publish_to(exchange, routing_key, body, props).await
    }

    async fn broadcast(&self, envelope: &Envelope) -> Result<(), TransportError> {
        let props = properties(
            &self.shared.user,
            envelope.message_id.to_string(),
            Some(envelope.message_type()),
        );
        let exchange = &self.shared.topology.control_exchange;
        self.publish_to(exchange, "", envelope.to_bytes(), props)
            .await
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        // Prefetch 0 means unlimited to RabbitMQ; the contract wants a bound.
        let prefetch = options.prefetch.max(1);
        let current = self.open_consumer(queue, prefetch).await?;
        let state = ConsumerState {
            transport: self.clone(),
            queue: queue.to_owned(),
            prefetch,
            current: Some(current),
            finished: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Ok(stream.boxed())
    }

    async fn subscribe_control(&self) -> Result<ControlStream, TransportError> {
        let current = self.open_control().await?;
        let state = ControlState {
            transport: self.clone(),
            current: Some(current),
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let envelope = state.next().await?;
            Some((envelope, state))
        });
        Ok(stream.boxed())
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64, TransportError> {
        self.retrying(|link| async move {
            link.with_admin(|ch| async move {
                let q = ch
                    .queue_declare(
                        queue.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| classify(e, Some(queue)))?;
                Ok(u64::from(q.message_count()))
            })
            .await
        })
        .await
    }

    async fn health(&self) -> Result<(), TransportError> {
        match self.link().await {
            Ok(_) => Ok(()),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Retry(e)) => Err(TransportError::Unavailable(Box::new(e))),
        }
    }
}

/// Closes a consumer's channel in the background, so the broker requeues what it held.
fn close_channel(ch: Channel, consumer: lapin::Consumer) {
    drop(consumer);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(async move {
                if let Err(e) = ch.close(200, "consumer dropped".into()).await {
                    tracing::debug!(error = %e, "amqp: closing a consumer channel");
                }
            });
        }
        // Without a runtime, dropping the last handle makes lapin close it.
        Err(_) => drop(ch),
    }
}

struct ConsumerState {
    transport: AmqpTransport,
    queue: String,
    prefetch: u16,
    current: Option<(Channel, lapin::Consumer)>,
    finished: bool,
}

impl Drop for ConsumerState {
    fn drop(&mut self) {
        if let Some((ch, consumer)) = self.current.take() {
            close_channel(ch, consumer);
        }
    }
}

impl ConsumerState {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            if self.finished {
                return None;
            }
            let consumer = match self.current.as_mut() {
                Some((_, consumer)) => consumer,
                None => match self
                    .transport
                    .open_consumer(&self.queue, self.prefetch)
                    .await
                {
                    Ok(current) => &mut self.current.insert(current).1,
                    Err(e) => {
                        // A vanished queue or a closed transport ends the stream; an
                        // outage is reported and retried on the next poll.
                        if !e.is_transient() {
                            self.finished = true;
                        }
                        return Some(Err(e));
                    }
                },
            };
            match consumer.next().await {
                Some(Ok(d)) => {
                    return Some(Ok(Delivery {
                        publisher: d
                            .properties
                            .user_id()
                            .as_ref()
                            .map(|u| u.as_str().to_owned()),
                        body: d.data,
                        redelivered: d.redelivered,
                        acker: Box::new(AmqpAcker(d.acker)),
                    }))
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "amqp: consumer interrupted, re-consuming");
                }
                None => {
                    tracing::warn!(queue = %self.queue, "amqp: consumer cancelled, re-consuming");
                }
            }
            if let Some((ch, consumer)) = self.current.take() {
                close_channel(ch, consumer);
            }
        }
    }
}

struct ControlState {
    transport: AmqpTransport,
    current: Option<(Channel, lapin::Consumer)>,
}

impl Drop for ControlState {
    fn drop(&mut self) {
        if let Some((ch, consumer)) = self.current.take() {
            close_channel(ch, consumer);
        }
    }
}

impl ControlState {
    async fn next(&mut self) -> Option<Envelope> {
        loop {
            let consumer = match self.current.as_mut() {
                Some((_, consumer)) => consumer,
                None => match self.transport.open_control().await {
                    Ok(current) => &mut self.current.insert(current).1,
                    Err(TransportError::Closed) => return None,
                    Err(e) => {
                        // Nothing to hand the caller (the stream carries envelopes): keep
                        // trying, retrying() already waited out one window.
                        tracing::error!(error = %e, "amqp: control subscription down");
                        tokio::time::sleep(MAX_BACKOFF).await;
                        continue;
                    }
                },
            };
            match consumer.next().await {
                Some(Ok(d)) => match Envelope::parse(&d.data) {
                    Ok(envelope) => return Some(envelope),
                    Err(e) => {
                        tracing::warn!(error = %e, "amqp: unparsable control message dropped")
                    }
                },
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "amqp: control consumer interrupted, resubscribing");
                    self.current = None;
                }
                None => {
                    tracing::warn!("amqp: control consumer cancelled, resubscribing");
                    self.current = None;
                }
            }
        }
    }
}

struct AmqpAcker(lapin::Acker);

impl AmqpAcker {
    fn outcome(&self, result: lapin::Result<bool>) -> Result<(), TransportError> {
        match result {
            Ok(true) => Ok(()),
            Ok(false) if self.0.poisoned() => Err(TransportError::Unavailable(
                "the channel closed before settling; the broker will redeliver".into(),
            )),
            Ok(false) => Err(TransportError::Backend("delivery already settled".into())),
            Err(e) => Err(TransportError::Unavailable(Box::new(e))),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        let r = self.0.ack(lapin::options::BasicAckOptions::default()).await;
        self.outcome(r)
    }

    async fn nack(&self, requeue: bool) -> Result<(), TransportError> {
        let r = self
            .0
            .nack(BasicNackOptions {
                multiple: false,
                requeue,
            })
            .await;
        self.outcome(r)
    }
}
