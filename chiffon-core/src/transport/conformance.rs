//! The transport conformance suite: one set of cases every [`Transport`] must pass, so the
//! in-process bus and RabbitMQ stay interchangeable.
//!
//! [`transport_conformance!`](crate::transport_conformance) expands one `#[tokio::test]` per
//! case for a fixture constructor:
//!
//! ```ignore
//! async fn fixture() -> Option<Fixture> {
//!     Some(Fixture::new(Arc::new(MemoryTransport::new(Topology::with_prefix("m.")))))
//! }
//! chiffon_core::transport_conformance!(fixture());
//! ```
//!
//! A constructor returns `None` to skip (after printing why, e.g. the broker is unreachable
//! outside CI). Each case runs in its own task so a failing case still runs the fixture's
//! teardown (deleting its queues on a shared broker) before the failure is reported.
//! Every wait is bounded, so a broken transport fails a case instead of hanging it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::time::timeout;

use chiffon_protocol::{Cancel, Envelope, ErrorCode, Message, UserRequest};

use super::{ConsumeOptions, Consumer, ControlStream, Delivery, Transport, TransportError};

/// How long any single expected event may take.
pub const STEP: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(500);
/// A whole case's limit.
pub const CASE: Duration = Duration::from_secs(120);

/// A transport under test and how to clean up after it.
pub struct Fixture {
    pub transport: Arc<dyn Transport>,
    teardown: Option<BoxFuture<'static, ()>>,
}

impl Fixture {
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Fixture {
            transport,
            teardown: None,
        }
    }

    /// Runs after the case, pass or fail.
    pub fn with_teardown(mut self, teardown: impl Future<Output = ()> + Send + 'static) -> Self {
        self.teardown = Some(teardown.boxed());
        self
    }
}

/// Runs one case against a fixture (`None`: skipped), then its teardown, then reports.
pub async fn run_case<F, Fut>(fixture: Option<Fixture>, case: F)
where
    F: FnOnce(Arc<dyn Transport>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(fixture) = fixture else {
        return;
    };
    let case = case(fixture.transport.clone());
    let outcome = tokio::spawn(async move {
        if timeout(CASE, case).await.is_err() {
            panic!("case did not finish within {}s", CASE.as_secs());
        }
    })
    .await;
    if let Some(teardown) = fixture.teardown {
        teardown.await;
    }
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("case task failed: {e}"),
        }
    }
}

/// One `#[tokio::test]` per conformance case, each built from `$fixture`, an expression
/// whose value is a future of `Option<Fixture>`.
#[macro_export]
macro_rules! transport_conformance {
    ($fixture:expr) => {
        $crate::transport_conformance!(@cases $fixture;
            publish_confirmed_then_consumed,
            ack_removes,
            nack_requeue_redelivers,
            redelivery_after_consumer_dropped,
            dead_letter_unparsable,
            broadcast_reaches_two_subscribers,
            ordering_within_queue,
            prefetch_bound_respected,
            queue_depth_counts_ready,
            unroutable_publish_is_dropped,
            consume_unknown_queue_fails,
            competing_consumers_share_work,
            declare_is_idempotent,
            large_message_arrives_whole,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::transport::conformance::run_case(
                    $fixture.await,
                    $crate::transport::conformance::$case,
                )
                .await;
            }
        )*
    };
}

// ---- helpers ----------------------------------------------------------------------------

/// A `user_request` envelope whose text identifies it.
pub fn envelope(text: &str) -> Envelope {
    Envelope::new(
        "trace-conformance",
        None,
        Message::UserRequest(UserRequest {
            text: text.to_owned(),
            requester: None,
            dry_run: false,
        }),
    )
}

fn text_of(d: &Delivery) -> String {
    match d.parse().expect("delivery parses").body {
        Message::UserRequest(u) => u.text,
        other => panic!("unexpected payload {other:?}"),
    }
}

/// The next delivery, or a panic saying why there is none.
pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    match timeout(STEP, consumer.next()).await {
        Err(_) => panic!("no delivery within {}s", STEP.as_secs()),
        Ok(None) => panic!("consumer stream ended"),
        Ok(Some(Err(e))) => panic!("consumer error: {e}"),
        Ok(Some(Ok(d))) => d,
    }
}

/// Panics if a delivery arrives within [`QUIET`].
pub async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Ok(Some(item)) = timeout(QUIET, consumer.next()).await {
        panic!("unexpected delivery: {item:?}");
    }
}

async fn next_control(stream: &mut ControlStream) -> Envelope {
    match timeout(STEP, stream.next()).await {
        Err(_) => panic!("no control message within {}s", STEP.as_secs()),
        Ok(None) => panic!("control stream ended"),
        Ok(Some(e)) => e,
    }
}

/// Waits until `queue` holds `expected` ready messages (brokers count asynchronously).
pub async fn wait_depth(t: &dyn Transport, queue: &str, expected: u64) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let depth = t.queue_depth(queue).await.expect("queue_depth");
        if depth == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("queue `{queue}` holds {depth} ready messages, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

async fn consume(t: &dyn Transport, queue: &str, prefetch: u16) -> Consumer {
    t.consume(queue, ConsumeOptions { prefetch })
        .await
        .expect("consume")
}

// ---- cases ------------------------------------------------------------------------------

/// A confirmed publish is consumed intact.
pub async fn publish_confirmed_then_consumed(t: Arc<dyn Transport>) {
    t.declare_topology().await.expect("declare_topology");
    let q = t.topology().requests_queue.clone();
    let sent = envelope("hello");
    t.publish(&q, &sent).await.expect("publish confirmed");
    let mut c = consume(&*t, &q, 8).await;
    let d = next_delivery(&mut c).await;
    assert!(!d.redelivered);
    assert_eq!(d.parse().expect("parses"), sent);
    d.ack().await.expect("ack");
    t.health().await.expect("healthy");
}

/// A message far larger than one frame (RabbitMQ splits a body into frames of the size
/// client and broker agreed on) arrives whole, with the small ones around it in order.
pub async fn large_message_arrives_whole(t: Arc<dyn Transport>) {
    t.declare_topology().await.expect("declare_topology");
    let q = t.topology().requests_queue.clone();
    let text: String = (0..300_000u32)
        .map(|i| char::from(b'a' + (i.wrapping_mul(7919) % 26) as u8))
        .collect();
    for sent in ["before", text.as_str(), "after"] {
        t.publish(&q, &envelope(sent))
            .await
            .expect("publish confirmed");
    }
    let mut c = consume(&*t, &q, 8).await;
    for want in ["before", text.as_str(), "after"] {
        let d = next_delivery(&mut c).await;
        let got = text_of(&d);
        assert!(
            got == want,
            "a {}-byte text came back as {} bytes",
            want.len(),
            got.len()
        );
        d.ack().await.expect("ack");
    }
}

/// An acked message is gone for good; settling twice is an error.
pub async fn ack_removes(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().results_queue.clone();
    t.publish(&q, &envelope("once")).await.unwrap();
    let mut c = consume(&*t, &q, 8).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(text_of(&d), "once");
    d.ack().await.expect("ack");
    assert!(d.ack().await.is_err(), "second ack must fail");
    assert_no_delivery(&mut c).await;
    drop(c);
    wait_depth(&*t, &q, 0).await;
    let mut c = consume(&*t, &q, 8).await;
    assert_no_delivery(&mut c).await;
}

/// `requeue` puts the message back at the head, marked redelivered.
pub async fn nack_requeue_redelivers(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().requests_queue.clone();
    t.publish(&q, &envelope("a")).await.unwrap();
    t.publish(&q, &envelope("b")).await.unwrap();
    let mut c = consume(&*t, &q, 1).await;
    let d = next_delivery(&mut c).await;
    assert_eq!((text_of(&d).as_str(), d.redelivered), ("a", false));
    d.requeue().await.expect("requeue");
    let d = next_delivery(&mut c).await;
    assert_eq!((text_of(&d).as_str(), d.redelivered), ("a", true));
    d.ack().await.unwrap();
    let d = next_delivery(&mut c).await;
    assert_eq!((text_of(&d).as_str(), d.redelivered), ("b", false));
    d.ack().await.unwrap();
}

/// A consumer dropped mid-message: its delivery goes to another consumer, redelivered.
pub async fn redelivery_after_consumer_dropped(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().agent_queue("infrastructure");
    t.publish(&q, &envelope("job")).await.unwrap();
    let mut first = consume(&*t, &q, 1).await;
    let d = next_delivery(&mut first).await;
    assert!(!d.redelivered);
    let mut second = consume(&*t, &q, 1).await;
    assert_no_delivery(&mut second).await;
    // The worker dies holding the message, never settling it.
    drop(d);
    drop(first);
    let d = next_delivery(&mut second).await;
    assert_eq!(text_of(&d), "job");
    assert!(d.redelivered, "a redelivery is marked");
    d.ack().await.unwrap();
    wait_depth(&*t, &q, 0).await;
}

/// Garbage cannot be parsed (5001) and, dead-lettered, is found intact on the DLQ.
pub async fn dead_letter_unparsable(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().requests_queue.clone();
    let dlq = t.topology().dead_letter_queue.clone();
    let garbage = b"\x00\xffnot json {".to_vec();
    t.publish_bytes(&q, garbage.clone()).await.unwrap();
    let mut c = consume(&*t, &q, 8).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.body, garbage);
    let err = d.parse().expect_err("garbage must not parse");
    assert_eq!(err.code, ErrorCode::MalformedMessage);
    assert_eq!(err.code.code(), 5001);
    d.dead_letter().await.expect("dead_letter");
    assert_no_delivery(&mut c).await;
    wait_depth(&*t, &q, 0).await;
    let mut dead = consume(&*t, &dlq, 8).await;
    let d = next_delivery(&mut dead).await;
    assert_eq!(d.body, garbage);
    d.ack().await.unwrap();
    wait_depth(&*t, &dlq, 0).await;
}

/// Every control subscriber gets every broadcast, in order.
pub async fn broadcast_reaches_two_subscribers(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let mut s1 = t.subscribe_control().await.expect("subscribe");
    let mut s2 = t.subscribe_control().await.expect("subscribe");
    let cancel = |reason: &str| {
        Envelope::new(
            "trace-conformance",
            None,
            Message::Cancel(Cancel {
                task_id: uuid::Uuid::new_v4(),
                reason: Some(reason.to_owned()),
            }),
        )
    };
    let (one, two) = (cancel("one"), cancel("two"));
    t.broadcast(&one).await.expect("broadcast");
    t.broadcast(&two).await.expect("broadcast");
    for s in [&mut s1, &mut s2] {
        assert_eq!(next_control(s).await, one);
        assert_eq!(next_control(s).await, two);
    }
}

/// Sequentially published messages come out in order.
pub async fn ordering_within_queue(t: Arc<dyn Transport>) {
    const N: usize = 200;
    t.declare_topology().await.unwrap();
    let q = t.topology().results_queue.clone();
    for i in 0..N {
        t.publish_bytes(&q, i.to_string().into_bytes())
            .await
            .unwrap();
    }
    let mut c = consume(&*t, &q, 50).await;
    for i in 0..N {
        let d = next_delivery(&mut c).await;
        assert_eq!(
            String::from_utf8_lossy(&d.body),
            i.to_string(),
            "message {i}"
        );
        d.ack().await.unwrap();
    }
    assert_no_delivery(&mut c).await;
}

/// A consumer never holds more unsettled deliveries than its prefetch.
pub async fn prefetch_bound_respected(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().requests_queue.clone();
    for i in 0..5 {
        t.publish(&q, &envelope(&i.to_string())).await.unwrap();
    }
    let mut c = consume(&*t, &q, 2).await;
    let d0 = next_delivery(&mut c).await;
    let d1 = next_delivery(&mut c).await;
    assert_eq!((text_of(&d0), text_of(&d1)), ("0".into(), "1".into()));
    assert_no_delivery(&mut c).await;
    wait_depth(&*t, &q, 3).await;
    d0.ack().await.unwrap();
    let d2 = next_delivery(&mut c).await;
    assert_eq!(text_of(&d2), "2");
    assert_no_delivery(&mut c).await;
    for d in [d1, d2] {
        d.ack().await.unwrap();
    }
    for expected in ["3", "4"] {
        let d = next_delivery(&mut c).await;
        assert_eq!(text_of(&d), expected);
        d.ack().await.unwrap();
    }
    wait_depth(&*t, &q, 0).await;
}

/// `queue_depth` counts ready messages, not unacked ones, and knows missing queues.
pub async fn queue_depth_counts_ready(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().desktop_queue("conformance-host");
    t.declare_queue(&q).await.unwrap();
    wait_depth(&*t, &q, 0).await;
    for i in 0..3 {
        t.publish(&q, &envelope(&i.to_string())).await.unwrap();
    }
    wait_depth(&*t, &q, 3).await;
    let mut c = consume(&*t, &q, 1).await;
    let d = next_delivery(&mut c).await;
    wait_depth(&*t, &q, 2).await;
    d.ack().await.unwrap();
    let missing = t.topology().agent_queue(&unique("missing"));
    match t.queue_depth(&missing).await {
        Err(e @ TransportError::NoSuchQueue(_)) => assert_eq!(e.code(), ErrorCode::NotFound),
        other => panic!("expected NoSuchQueue, got {other:?}"),
    }
}

/// A routing key no queue is bound to: the publish is confirmed and the message dropped.
pub async fn unroutable_publish_is_dropped(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let q = t.topology().agent_queue(&unique("late"));
    t.publish(&q, &envelope("void"))
        .await
        .expect("unroutable publish still returns Ok");
    t.declare_queue(&q).await.unwrap();
    wait_depth(&*t, &q, 0).await;
    t.publish(&q, &envelope("kept")).await.unwrap();
    let mut c = consume(&*t, &q, 8).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(text_of(&d), "kept");
    d.ack().await.unwrap();
}

/// Consuming a queue that was never declared is a typed error.
pub async fn consume_unknown_queue_fails(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    let missing = t.topology().agent_queue(&unique("missing"));
    match t.consume(&missing, ConsumeOptions::default()).await {
        Err(TransportError::NoSuchQueue(name)) => assert_eq!(name, missing),
        Err(e) => panic!("expected NoSuchQueue, got {e:?}"),
        Ok(_) => panic!("consuming an undeclared queue succeeded"),
    }
    // The transport is still usable afterwards (on AMQP the 404 closed a channel).
    let q = t.topology().requests_queue.clone();
    t.publish(&q, &envelope("after")).await.unwrap();
    wait_depth(&*t, &q, 1).await;
}

/// Competing consumers: each message goes to exactly one of them.
pub async fn competing_consumers_share_work(t: Arc<dyn Transport>) {
    const N: usize = 20;
    t.declare_topology().await.unwrap();
    let q = t.topology().agent_queue("infrastructure");
    let a = consume(&*t, &q, 1).await;
    let b = consume(&*t, &q, 1).await;
    for i in 0..N {
        t.publish_bytes(&q, i.to_string().into_bytes())
            .await
            .unwrap();
    }
    let mut both: Consumer = futures::stream::select(a, b).boxed();
    let mut seen = HashSet::new();
    for _ in 0..N {
        let d = next_delivery(&mut both).await;
        assert!(
            seen.insert(d.body.clone()),
            "delivered twice: {:?}",
            String::from_utf8_lossy(&d.body)
        );
        d.ack().await.unwrap();
    }
    assert_no_delivery(&mut both).await;
    assert_eq!(seen.len(), N);
}

/// Declaring twice changes nothing; a desktop queue is routed by its name.
pub async fn declare_is_idempotent(t: Arc<dyn Transport>) {
    t.declare_topology().await.unwrap();
    t.declare_topology().await.unwrap();
    let q = t.topology().desktop_queue("idempotent-host");
    t.declare_queue(&q).await.unwrap();
    t.publish(&q, &envelope("survives")).await.unwrap();
    t.declare_queue(&q).await.unwrap();
    wait_depth(&*t, &q, 1).await;
    let mut c = consume(&*t, &q, 8).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(text_of(&d), "survives");
    d.ack().await.unwrap();
    let dead = t.topology().dead_letter_queue.clone();
    assert!(
        t.declare_queue(&dead).await.is_err(),
        "the dead-letter queue is not a work queue"
    );
    assert!(t.declare_queue("").await.is_err(), "empty queue name");
    assert!(
        ["amqp", "memory"].contains(&t.backend()),
        "backend {}",
        t.backend()
    );
}
