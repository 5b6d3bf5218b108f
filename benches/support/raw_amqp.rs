//! The yardstick: raw RabbitMQ persistent request/reply with publisher confirms and manual
//! acks (lapin, no Chiffon code), measured in the same run as the pipeline, so the pipeline's
//! figures can be read as a ratio of what the broker itself allows on this machine.
//!
//! One "client" connection publishes a persistent request, waits for its confirm and then
//! for the reply; one "server" connection consumes the request, publishes a persistent reply
//! (confirm awaited) and acks. That is the least a durable dispatch and result can cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::oneshot;

pub struct Baseline {
    /// Round trips per second with `in_flight` outstanding.
    pub rate: f64,
    /// Sequential round trip, median.
    pub sequential_p50: Duration,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

async fn confirmed_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

async fn publish(ch: &Channel, queue: &str, id: &str, body: &[u8]) -> anyhow::Result<()> {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_correlation_id(id.into());
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await?;
    anyhow::ensure!(confirm.await?.is_ack(), "the broker nacked a publish");
    Ok(())
}

/// Measures `total` round trips at `in_flight`, then `sequential` one at a time.
pub async fn measure(
    url: &str,
    total: usize,
    in_flight: usize,
    sequential: usize,
) -> anyhow::Result<Baseline> {
    let tag = format!("raw-baseline-{}", std::process::id());
    let (requests, replies) = (format!("{tag}.requests"), format!("{tag}.replies"));
    let server = Connection::connect(url, ConnectionProperties::default()).await?;
    let client = Connection::connect(url, ConnectionProperties::default()).await?;
    let admin = client.create_channel().await?;
    for q in [&requests, &replies] {
        admin
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
    }

    // The server: consume, reply (persistent, confirmed), ack.
    let server_in = server.create_channel().await?;
    server_in
        .basic_qos(
            in_flight.min(u16::MAX as usize) as u16,
            BasicQosOptions::default(),
        )
        .await?;
    let server_out = confirmed_channel(&server).await?;
    let consumer = server_in
        .basic_consume(
            requests.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let reply_queue = replies.clone();
    let serving = tokio::spawn(async move {
        consumer
            .for_each_concurrent(None, |d| {
                let out = server_out.clone();
                let reply_queue = reply_queue.clone();
                async move {
                    let Ok(d) = d else { return };
                    let id = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    if publish(&out, &reply_queue, &id, &d.data).await.is_ok() {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                }
            })
            .await
    });

    // The client: replies matched to waiters by correlation id.
    let waiters: Waiters = Arc::default();
    let client_in = client.create_channel().await?;
    let replies_consumer = client_in
        .basic_consume(
            replies.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let w = waiters.clone();
    let receiving = tokio::spawn(async move {
        replies_consumer
            .for_each_concurrent(None, |d| {
                let w = w.clone();
                async move {
                    let Ok(d) = d else { return };
                    let _ = d.ack(BasicAckOptions::default()).await;
                    let id = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    if let Some(tx) = w.lock().unwrap().remove(&id) {
                        let _ = tx.send(());
                    }
                }
            })
            .await
    });
    let client_out = confirmed_channel(&client).await?;
    let body = vec![b'x'; 512];
    let round_trip = |i: usize| {
        let (ch, waiters, requests, body) = (
            client_out.clone(),
            waiters.clone(),
            requests.clone(),
            body.clone(),
        );
        async move {
            let id = format!("{i}");
            let (tx, rx) = oneshot::channel();
            waiters.lock().unwrap().insert(id.clone(), tx);
            publish(&ch, &requests, &id, &body).await?;
            tokio::time::timeout(Duration::from_secs(30), rx).await??;
            anyhow::Ok(())
        }
    };

    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(round_trip)
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rate = total as f64 / started.elapsed().as_secs_f64();

    let mut times = Vec::with_capacity(sequential);
    for i in 0..sequential {
        let t = Instant::now();
        round_trip(total + i).await?;
        times.push(t.elapsed());
    }
    times.sort();
    let sequential_p50 = times.get(times.len() / 2).copied().unwrap_or_default();

    serving.abort();
    receiving.abort();
    for q in [&requests, &replies] {
        let _ = admin
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = client.close(200, "done".into()).await;
    let _ = server.close(200, "done".into()).await;
    Ok(Baseline {
        rate,
        sequential_p50,
    })
}
