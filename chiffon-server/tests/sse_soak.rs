//! A soak test of the live-events route over real TCP on loopback: many event streams of
//! unknown requests must leave nothing behind (each used to keep a ~100 kB broadcast channel
//! for good). Its own test binary, so the process's memory is this test's alone.
//!
//! `CHIFFON_SOAK_STREAMS` sets the number of streams (default 20000).

use std::time::Instant;

use chiffon_server::testing::start_app;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use uuid::Uuid;

/// Resident memory of this process, bytes (`/proc/self/statm`, Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Sends `count` `GET /request/{unknown}/events` on one keep-alive connection; returns the
/// statuses seen.
async fn unknown_streams(addr: std::net::SocketAddr, count: usize) -> Vec<u16> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut statuses = Vec::with_capacity(count);
    let mut line = String::new();
    for _ in 0..count {
        let req = format!(
            "GET /request/{}/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n",
            Uuid::new_v4()
        );
        write.write_all(req.as_bytes()).await.unwrap();
        line.clear();
        read.read_line(&mut line).await.unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await.unwrap();
        statuses.push(status);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unknown_event_streams_leave_nothing_behind() {
    let total: usize = std::env::var("CHIFFON_SOAK_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir.path(), vec![]).await;
    let listener = app.bind().await.unwrap();
    let addr = app.serve(listener).unwrap();
    assert!(addr.ip().is_loopback());
    let engine = app.engine().clone();

    // Warm up (allocator arenas, connection buffers, SQLite caches) before the baseline.
    let warm = unknown_streams(addr, 500).await;
    assert!(warm.iter().all(|s| *s == 404), "{warm:?}");
    let before = rss_bytes();
    let started = Instant::now();

    const CONNECTIONS: usize = 4;
    let per = total.div_ceil(CONNECTIONS);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(unknown_streams(addr, per)))
        .collect();
    let mut answered = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 404), "only 404s expected");
        answered += statuses.len();
    }
    let after = rss_bytes();
    eprintln!(
        "{answered} unknown-id event streams in {:.1?}; RSS {:?} -> {:?} bytes; hub channels {}",
        started.elapsed(),
        before,
        after,
        engine.event_channels()
    );

    assert_eq!(engine.event_channels(), 0, "the hub holds no channel");
    if let (Some(before), Some(after)) = (before, after) {
        // Each leaked channel was ~100 kB, so 20000 streams leaked ~2 GB; allow 64 MiB of
        // allocator noise.
        let grown = after.saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "RSS grew by {} MiB over {answered} streams",
            grown >> 20
        );
    }
    app.shutdown().await;
}
