//! The in-process bus against the transport conformance suite, plus its memory bound.

use std::sync::Arc;
use std::time::Duration;

use chiffon_core::transport::conformance::{next_delivery, Fixture};
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{ConsumeOptions, Topology, Transport, TransportError};

async fn fixture() -> Option<Fixture> {
    Some(Fixture::new(Arc::new(MemoryTransport::new(
        Topology::with_prefix("m."),
    ))))
}

chiffon_core::transport_conformance!(fixture());

#[tokio::test]
async fn full_queue_makes_publish_wait_for_room() {
    let t = MemoryTransport::with_capacity(Topology::contract(), 2);
    t.declare_topology().await.unwrap();
    let q = t.topology().requests_queue.clone();
    t.publish_bytes(&q, b"1".to_vec()).await.unwrap();
    t.publish_bytes(&q, b"2".to_vec()).await.unwrap();
    let waiting = {
        let t = t.clone();
        let q = q.clone();
        tokio::spawn(async move { t.publish_bytes(&q, b"3".to_vec()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "a publish to a full queue waits");
    assert_eq!(t.queue_depth(&q).await.unwrap(), 2);
    let mut c = t.consume(&q, ConsumeOptions { prefetch: 1 }).await.unwrap();
    let d = next_delivery(&mut c).await;
    assert_eq!(d.body, b"1");
    waiting
        .await
        .unwrap()
        .expect("publish completes once there is room");
    assert_eq!(t.queue_depth(&q).await.unwrap(), 2);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn full_queue_publish_gives_up_after_the_wait() {
    let wait = Duration::from_millis(300);
    let t = MemoryTransport::with_limits(Topology::contract(), 1, wait);
    t.declare_topology().await.unwrap();
    let q = t.topology().results_queue.clone();
    t.publish_bytes(&q, b"1".to_vec()).await.unwrap();
    let started = tokio::time::Instant::now();
    match t.publish_bytes(&q, b"2".to_vec()).await {
        Err(e @ TransportError::NotConfirmed(_)) => assert!(e.is_transient()),
        other => panic!("expected NotConfirmed, got {other:?}"),
    }
    assert!(started.elapsed() >= wait);
    assert_eq!(t.queue_depth(&q).await.unwrap(), 1);
}

#[tokio::test]
async fn clones_share_one_bus() {
    let engine = MemoryTransport::new(Topology::contract());
    let agent = engine.clone();
    engine.declare_topology().await.unwrap();
    let q = engine.topology().agent_queue("infrastructure");
    engine.publish_bytes(&q, b"x".to_vec()).await.unwrap();
    assert_eq!(agent.queue_depth(&q).await.unwrap(), 1);
}
