//! The in-process bus: RabbitMQ's semantics without a broker, for `chiffon up` and
//! `chiffon run`, where the engine and its agents share one process.
//!
//! What it keeps from RabbitMQ, so code written against it behaves the same on AMQP:
//! - a direct work exchange: a queue receives what is published with its name as routing
//!   key once it is declared ([`Transport::declare_queue`] or [`Transport::declare_topology`]).
//!   Publishing to a routing key no queue is bound to drops the message and still returns
//!   `Ok`, as a direct exchange does with a confirmed but unroutable message;
//! - FIFO per queue, competing consumers, a per-consumer prefetch limit, explicit settling:
//!   `ack` removes, `nack(requeue)` puts the message back at the head with
//!   `redelivered = true`, `nack` without requeue moves it to the dead-letter queue;
//! - dropping a [`Consumer`] returns its unsettled deliveries to the head of the queue, in
//!   their order, marked `redelivered`; settling one of them afterwards, or settling any
//!   delivery twice, is an error;
//! - control broadcasts reach every subscriber (a tokio broadcast channel).
//!
//! Memory is bounded: a queue holds at most [`DEFAULT_QUEUE_CAPACITY`] ready messages
//! (see [`MemoryTransport::with_limits`]); a publish to a full queue waits for room, up to
//! [`PUBLISH_WAIT`], then fails with [`TransportError::NotConfirmed`], as a publish whose
//! confirm never came. Requeued and dead-lettered messages never wait (they are already
//! counted, and a dead letter must not be lost), so a queue may briefly exceed the bound
//! by its consumers' prefetch, and the dead-letter queue grows until it is drained.
//! Nothing survives the process: the durable bus is [`super::amqp`]'s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{broadcast, Notify};
use tokio_stream::wrappers::BroadcastStream;

use chiffon_protocol::Envelope;

use super::{
    Acker, ConsumeOptions, Consumer, ControlStream, Delivery, Topology, Transport, TransportError,
};

/// The publisher of a [`MemoryTransport`] made without [`MemoryTransport::with_identity`].
pub const DEFAULT_IDENTITY: &str = "local";

/// Ready messages one queue holds before publishes to it wait.
pub const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
/// How long a publish waits for room in a full queue.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(30);
/// Control messages a slow subscriber may fall behind by before it misses some.
const CONTROL_BACKLOG: usize = 1024;

/// The in-process [`Transport`]. Cheap to clone: clones share one bus.
#[derive(Clone)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
    /// The publisher every message of this handle carries ([`Delivery::publisher`]), as a
    /// broker user does on RabbitMQ. [`MemoryTransport::with_identity`] gives in-process
    /// components their own.
    identity: Arc<str>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("topology", &self.inner.topology)
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

struct Inner {
    topology: Topology,
    capacity: usize,
    publish_wait: Duration,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    control: broadcast::Sender<Envelope>,
}

struct Queue {
    /// Bound to the work exchange with its own name (the dead-letter queue is not).
    bound: bool,
    /// Where `nack(false)` sends a message; `None` on the dead-letter queue itself, whose
    /// rejected messages are dropped, as RabbitMQ does for a queue without a DLX.
    dead_letter: Option<Arc<Queue>>,
    ready: Mutex<VecDeque<Message>>,
    /// Woken when a message becomes ready: consumers wait on it.
    readied: Notify,
    /// Woken when a message leaves: publishers to a full queue wait on it.
    drained: Notify,
}

#[derive(Clone)]
struct Message {
    body: Vec<u8>,
    redelivered: bool,
    publisher: Arc<str>,
}

/// A poisoned lock only means another thread panicked mid-update of plain collections;
/// the data is still consistent enough to keep serving, so recover instead of panicking.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    fn new(bound: bool, dead_letter: Option<Arc<Queue>>) -> Self {
        Queue {
            bound,
            dead_letter,
            ready: Mutex::new(VecDeque::new()),
            readied: Notify::new(),
            drained: Notify::new(),
        }
    }

    /// Appends without waiting for room (requeues and dead letters).
    fn push_back_now(&self, msg: Message) {
        lock(&self.ready).push_back(msg);
        self.readied.notify_waiters();
    }

    async fn publish(
        &self,
        msg: Message,
        capacity: usize,
        publish_wait: Duration,
    ) -> Result<(), TransportError> {
        let wait = async {
            loop {
                // Registered before the check so a drain between check and wait is not missed.
                let drained = self.drained.notified();
                {
                    let mut ready = lock(&self.ready);
                    if ready.len() < capacity {
                        ready.push_back(msg);
                        break;
                    }
                }
                drained.await;
            }
        };
        tokio::time::timeout(publish_wait, wait)
            .await
            .map_err(|_| {
                TransportError::NotConfirmed(format!(
                    "queue stayed full ({capacity} messages) for {publish_wait:?}"
                ))
            })?;
        self.readied.notify_waiters();
        Ok(())
    }
}

impl MemoryTransport {
    /// A bus with the given names and [`DEFAULT_QUEUE_CAPACITY`].
    pub fn new(topology: Topology) -> Self {
        MemoryTransport::with_capacity(topology, DEFAULT_QUEUE_CAPACITY)
    }

    /// A bus whose queues hold at most `capacity` ready messages (at least 1).
    pub fn with_capacity(topology: Topology, capacity: usize) -> Self {
        MemoryTransport::with_limits(topology, capacity, PUBLISH_WAIT)
    }

    /// A bus whose queues hold at most `capacity` ready messages (at least 1), where a
    /// publish to a full queue waits at most `publish_wait`.
    pub fn with_limits(topology: Topology, capacity: usize, publish_wait: Duration) -> Self {
        let (control, _) = broadcast::channel(CONTROL_BACKLOG);
        MemoryTransport {
            inner: Arc::new(Inner {
                topology,
                capacity: capacity.max(1),
                publish_wait,
                queues: Mutex::new(HashMap::new()),
                control,
            }),
            identity: Arc::from(DEFAULT_IDENTITY),
        }
    }

    /// A handle on the same bus whose messages carry `identity` as their publisher, the
    /// way each RabbitMQ connection carries its broker user.
    pub fn with_identity(&self, identity: &str) -> Self {
        MemoryTransport {
            inner: self.inner.clone(),
            identity: Arc::from(identity),
        }
    }

    /// The publisher this handle's messages carry.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>, TransportError> {
        lock(&self.inner.queues)
            .get(name)
            .cloned()
            .ok_or_else(|| TransportError::NoSuchQueue(name.to_owned()))
    }

    fn dead_letter_queue(&self) -> Arc<Queue> {
        let name = self.inner.topology.dead_letter_queue.clone();
        lock(&self.inner.queues)
            .entry(name)
            .or_insert_with(|| Arc::new(Queue::new(false, None)))
            .clone()
    }
}

/// RabbitMQ's rules for a queue name, so a name accepted here is accepted there.
pub(super) fn check_queue_name(queue: &str) -> Result<(), TransportError> {
    if queue.is_empty() || queue.len() > 255 || queue.starts_with("amq.") {
        return Err(TransportError::Backend(
            format!("invalid queue name `{queue}`: 1 to 255 bytes, not starting with `amq.`")
                .into(),
        ));
    }
    Ok(())
}

#[async_trait]
impl Transport for MemoryTransport {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    async fn declare_topology(&self) -> Result<(), TransportError> {
        self.dead_letter_queue();
        for queue in self.inner.topology.fixed_queues() {
            self.declare_queue(&queue).await?;
        }
        Ok(())
    }

    async fn declare_queue(&self, queue: &str) -> Result<(), TransportError> {
        check_queue_name(queue)?;
        if queue == self.inner.topology.dead_letter_queue {
            // On RabbitMQ this would fail: the dead-letter queue has no DLX arguments.
            return Err(TransportError::Backend(
                format!("`{queue}` is the dead-letter queue, not a work queue").into(),
            ));
        }
        let dead = self.dead_letter_queue();
        lock(&self.inner.queues)
            .entry(queue.to_owned())
            .or_insert_with(|| Arc::new(Queue::new(true, Some(dead))));
        Ok(())
    }

    async fn publish_bytes(&self, routing_key: &str, body: Vec<u8>) -> Result<(), TransportError> {
        let queue = lock(&self.inner.queues)
            .get(routing_key)
            .filter(|q| q.bound)
            .cloned();
        match queue {
            Some(queue) => {
                let msg = Message {
                    body,
                    redelivered: false,
                    publisher: self.identity.clone(),
                };
                queue
                    .publish(msg, self.inner.capacity, self.inner.publish_wait)
                    .await
            }
            None => {
                tracing::debug!(routing_key, "memory bus: no queue bound, message dropped");
                Ok(())
            }
        }
    }

    async fn broadcast(&self, envelope: &Envelope) -> Result<(), TransportError> {
        // No subscriber is not an error: a fanout exchange without queues drops too.
        let _ = self.inner.control.send(envelope.clone());
        Ok(())
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        let queue = self.queue(queue)?;
        let consumer = Arc::new(ConsumerShared {
            queue,
            // RabbitMQ reads prefetch 0 as "unlimited"; bounded memory wants a limit.
            prefetch: usize::from(options.prefetch.max(1)),
            state: Mutex::new(ConsumerState {
                next_tag: 0,
                unacked: BTreeMap::new(),
                closed: false,
            }),
            credit: Notify::new(),
        });
        let guard = ConsumerGuard(consumer);
        let stream = futures::stream::unfold(guard, |guard| async move {
            let delivery = guard.0.next_delivery().await;
            Some((Ok(delivery), guard))
        });
        Ok(stream.boxed())
    }

    async fn subscribe_control(&self) -> Result<ControlStream, TransportError> {
        let stream = BroadcastStream::new(self.inner.control.subscribe()).filter_map(|r| async {
            match r {
                Ok(envelope) => Some(envelope),
                Err(e) => {
                    tracing::warn!(error = %e, "control subscriber fell behind, messages missed");
                    None
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64, TransportError> {
        let queue = self.queue(queue)?;
        let depth = lock(&queue.ready).len();
        Ok(depth as u64)
    }

    async fn health(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// One consumer's view: what it holds unsettled, keyed by delivery order.
struct ConsumerShared {
    queue: Arc<Queue>,
    prefetch: usize,
    state: Mutex<ConsumerState>,
    /// Woken when a delivery is settled and the consumer may take another.
    credit: Notify,
}

struct ConsumerState {
    next_tag: u64,
    unacked: BTreeMap<u64, Message>,
    /// The stream was dropped: its deliveries went back to the queue.
    closed: bool,
}

enum Wait {
    Credit,
    Message,
}

impl ConsumerShared {
    async fn next_delivery(self: &Arc<Self>) -> Delivery {
        loop {
            // Both registered before looking, so a wake-up in between is not lost.
            let credit = self.credit.notified();
            let readied = self.queue.readied.notified();
            let wait = {
                let mut state = lock(&self.state);
                if state.unacked.len() >= self.prefetch {
                    Wait::Credit
                } else {
                    let next = lock(&self.queue.ready).pop_front();
                    match next {
                        Some(msg) => {
                            let tag = state.next_tag;
                            state.next_tag += 1;
                            state.unacked.insert(tag, msg.clone());
                            drop(state);
                            self.queue.drained.notify_waiters();
                            return Delivery {
                                body: msg.body,
                                redelivered: msg.redelivered,
                                publisher: Some(msg.publisher.to_string()),
                                acker: Box::new(MemoryAcker {
                                    consumer: self.clone(),
                                    tag,
                                }),
                            };
                        }
                        None => Wait::Message,
                    }
                }
            };
            match wait {
                Wait::Credit => credit.await,
                Wait::Message => readied.await,
            }
        }
    }

    fn settle(&self, tag: u64) -> Result<Message, TransportError> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(TransportError::Backend(
                "the consumer was dropped; its deliveries went back to the queue".into(),
            ));
        }
        let msg = state
            .unacked
            .remove(&tag)
            .ok_or_else(|| TransportError::Backend("delivery already settled".into()))?;
        drop(state);
        self.credit.notify_one();
        Ok(msg)
    }
}

/// Returns the consumer's unsettled deliveries to its queue when the stream is dropped.
struct ConsumerGuard(Arc<ConsumerShared>);

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.closed = true;
        let unacked = std::mem::take(&mut state.unacked);
        if unacked.is_empty() {
            return;
        }
        {
            let mut ready = lock(&self.0.queue.ready);
            // Pushed to the front newest first, so they come back in their original order.
            for (_, mut msg) in unacked.into_iter().rev() {
                msg.redelivered = true;
                ready.push_front(msg);
            }
        }
        drop(state);
        self.0.queue.readied.notify_waiters();
    }
}

struct MemoryAcker {
    consumer: Arc<ConsumerShared>,
    tag: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.consumer.settle(self.tag).map(drop)
    }

    async fn nack(&self, requeue: bool) -> Result<(), TransportError> {
        let mut msg = self.consumer.settle(self.tag)?;
        let queue = &self.consumer.queue;
        if requeue {
            msg.redelivered = true;
            lock(&queue.ready).push_front(msg);
            queue.readied.notify_waiters();
        } else if let Some(dead) = &queue.dead_letter {
            msg.redelivered = false;
            dead.push_back_now(msg);
        } else {
            tracing::warn!("message rejected on the dead-letter queue, dropped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropped_consumer_returns_deliveries_in_order() {
        let t = MemoryTransport::new(Topology::contract());
        t.declare_topology().await.unwrap();
        let q = t.topology().requests_queue.clone();
        for i in 0..3u8 {
            t.publish_bytes(&q, vec![i]).await.unwrap();
        }
        let mut c = t.consume(&q, ConsumeOptions { prefetch: 2 }).await.unwrap();
        let a = c.next().await.unwrap().unwrap();
        let b = c.next().await.unwrap().unwrap();
        assert_eq!((a.body[0], b.body[0]), (0, 1));
        drop(c);
        assert!(
            a.ack().await.is_err(),
            "settling after the consumer dropped"
        );
        let mut c = t.consume(&q, ConsumeOptions::default()).await.unwrap();
        for i in 0..3u8 {
            let d = c.next().await.unwrap().unwrap();
            assert_eq!(d.body, vec![i]);
            assert_eq!(d.redelivered, i < 2);
            d.ack().await.unwrap();
        }
    }

    #[tokio::test]
    async fn dead_letter_queue_is_not_a_work_queue() {
        let t = MemoryTransport::new(Topology::contract());
        let dead = t.topology().dead_letter_queue.clone();
        assert!(t.declare_queue(&dead).await.is_err());
        assert!(t.declare_queue("").await.is_err());
        assert!(t.declare_queue("amq.x").await.is_err());
    }
}
