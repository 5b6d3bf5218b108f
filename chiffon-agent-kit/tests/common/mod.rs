//! Test helpers: a bus per test (in-process or RabbitMQ with its own names), a results
//! collector, and work-request builders.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chiffon_core::transport::amqp::{AmqpOptions, AmqpTransport};
use chiffon_core::transport::memory::MemoryTransport;
use chiffon_core::transport::{ConsumeOptions, Topology, Transport};
use chiffon_protocol::{Envelope, Message, WorkRequest, WorkResult, WorkStatus};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Memory,
    Amqp,
}

pub struct Bus {
    pub kind: Kind,
    pub transport: Arc<dyn Transport>,
    pub amqp: Option<AmqpTransport>,
    pub prefix: String,
}

pub fn amqp_url() -> String {
    std::env::var("CHIFFON_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh bus with random names; `None` (after a loud SKIPPED line) when RabbitMQ is
/// unreachable outside CI.
pub async fn bus(kind: Kind) -> Option<Bus> {
    let prefix = format!("t{}.", &Uuid::new_v4().simple().to_string()[..10]);
    let topology = Topology::with_prefix(&prefix);
    match kind {
        Kind::Memory => Some(Bus {
            kind,
            transport: Arc::new(MemoryTransport::new(topology)),
            amqp: None,
            prefix,
        }),
        Kind::Amqp => {
            let opts = AmqpOptions {
                retry_window: Duration::from_secs(10),
                ..AmqpOptions::default()
            };
            match AmqpTransport::connect_with_options(&amqp_url(), topology, opts).await {
                Ok(t) => Some(Bus {
                    kind,
                    transport: Arc::new(t.clone()),
                    amqp: Some(t),
                    prefix,
                }),
                Err(e) => {
                    if std::env::var("CI").is_ok_and(|v| v == "true") {
                        panic!("RabbitMQ unreachable at {} under CI=true: {e}", amqp_url());
                    }
                    eprintln!("SKIPPED: RabbitMQ unreachable ({e})");
                    None
                }
            }
        }
    }
}

impl Bus {
    pub async fn cleanup(self) {
        if let Some(a) = self.amqp {
            let _ = a.delete_topology().await;
            a.close().await;
        }
    }

    /// Consumes the results queue (acking everything) into a channel.
    pub async fn collect_results(&self) -> Results {
        self.transport.declare_topology().await.unwrap();
        let q = self.transport.topology().results_queue.clone();
        let mut c = self
            .transport
            .consume(&q, ConsumeOptions { prefetch: 256 })
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                let _ = d.ack().await;
                if let Ok(env) = d.parse() {
                    if tx.send(env).is_err() {
                        break;
                    }
                }
            }
        });
        Results {
            rx,
            seen: Vec::new(),
        }
    }

    pub async fn send(&self, queue: &str, work: &WorkRequest) -> Envelope {
        let env = Envelope::new(
            format!("trace-{}", work.task_id),
            Some(Uuid::new_v4()),
            Message::WorkRequest(work.clone()),
        );
        self.transport.declare_queue(queue).await.unwrap();
        self.transport.publish(queue, &env).await.unwrap();
        env
    }
}

pub struct Results {
    rx: mpsc::UnboundedReceiver<Envelope>,
    pub seen: Vec<Envelope>,
}

impl Results {
    /// Waits for the first message matching `f`, keeping everything seen.
    pub async fn wait_for(
        &mut self,
        what: &str,
        secs: u64,
        f: impl Fn(&Envelope) -> bool,
    ) -> Envelope {
        if let Some(e) = self.seen.iter().find(|e| f(e)) {
            return e.clone();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(env)) => {
                    self.seen.push(env.clone());
                    if f(&env) {
                        return env;
                    }
                }
                _ => panic!(
                    "timed out after {secs} s waiting for {what}; saw {:#?}",
                    self.seen
                        .iter()
                        .map(|e| e.message_type())
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    pub async fn result_of(&mut self, task_id: Uuid, secs: u64) -> WorkResult {
        let env = self
            .wait_for(
                "work_result",
                secs,
                |e| matches!(&e.body, Message::WorkResult(r) if r.task_id == task_id),
            )
            .await;
        match env.body {
            Message::WorkResult(r) => r,
            _ => unreachable!(),
        }
    }

    pub fn statuses_of(&self, task_id: Uuid) -> Vec<WorkStatus> {
        self.seen
            .iter()
            .filter_map(|e| match &e.body {
                Message::WorkStatus(s) if s.task_id == task_id => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn results_of(&self, task_id: Uuid) -> Vec<WorkResult> {
        self.seen
            .iter()
            .filter_map(|e| match &e.body {
                Message::WorkResult(r) if r.task_id == task_id => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Reads whatever arrives in the next `ms` milliseconds.
    pub async fn drain_for(&mut self, ms: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Some(env)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(env);
        }
    }
}

pub fn work(agent_type: &str, action: &str, params: Value) -> WorkRequest {
    serde_json::from_value(serde_json::json!({
        "agent_type": agent_type,
        "task_id": Uuid::new_v4(),
        "action": action,
        "parameters": params,
    }))
    .unwrap()
}

/// The repository's catalog.
pub fn playbooks() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks")
}

/// The repository's `ansible-playbook` (installed by scripts/ansible.sh when missing).
pub fn ansible_playbook() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/ansible-playbook");
    if venv.exists() {
        return venv;
    }
    let out = std::process::Command::new(root.join("scripts/ansible.sh"))
        .output()
        .expect("scripts/ansible.sh runs");
    assert!(
        out.status.success(),
        "scripts/ansible.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
