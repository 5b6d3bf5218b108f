//! Live events per request: what `GET /request/{id}/events` streams as SSE.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::model::{RequestStatus, StepStatus};

/// One live event of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EngineEvent {
    /// The request's status changed.
    Status {
        request_id: Uuid,
        status: RequestStatus,
        at: DateTime<Utc>,
    },
    /// A step reported progress.
    Progress {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        progress: u32,
        message: String,
        at: DateTime<Utc>,
    },
    /// A step printed a line.
    Output {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        line: String,
        at: DateTime<Utc>,
    },
    /// A step changed status (dispatched, completed, failed, …).
    Step {
        request_id: Uuid,
        task_id: Uuid,
        seq: u32,
        status: StepStatus,
        at: DateTime<Utc>,
    },
}

impl EngineEvent {
    pub fn request_id(&self) -> Uuid {
        match self {
            EngineEvent::Status { request_id, .. }
            | EngineEvent::Progress { request_id, .. }
            | EngineEvent::Output { request_id, .. }
            | EngineEvent::Step { request_id, .. } => *request_id,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            EngineEvent::Status { .. } => "status",
            EngineEvent::Progress { .. } => "progress",
            EngineEvent::Output { .. } => "output",
            EngineEvent::Step { .. } => "step",
        }
    }

    /// Whether this ends the request's stream.
    pub fn is_final(&self) -> bool {
        matches!(self, EngineEvent::Status { status, .. } if status.is_terminal())
    }
}

/// A broadcast channel per watched request, created on first subscribe and dropped once the
/// request ends or nobody listens. Publishing to a request nobody watches costs a map lookup.
#[derive(Debug, Default)]
pub struct EventHub {
    channels: Mutex<HashMap<Uuid, broadcast::Sender<EngineEvent>>>,
}

/// Events buffered per subscriber; a slower one sees `Lagged` and should re-read the request.
const CHANNEL_CAPACITY: usize = 1024;

impl EventHub {
    pub fn subscribe(&self, request_id: Uuid) -> broadcast::Receiver<EngineEvent> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(request_id)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe()
    }

    pub fn publish(&self, event: EngineEvent) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let id = event.request_id();
        let Some(tx) = map.get(&id) else { return };
        let last = event.is_final();
        let _ = tx.send(event);
        if last || tx.receiver_count() == 0 {
            map.remove(&id);
        }
    }

    /// Requests with live subscribers.
    pub fn watched(&self) -> usize {
        self.channels.lock().map(|m| m.len()).unwrap_or(0)
    }
}
