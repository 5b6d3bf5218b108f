//! Live events per request: what `GET /request/{id}/events` streams as SSE.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{Engine, EngineError};
use crate::model::{Request, RequestStatus, StepStatus};

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
///
/// A channel preallocates [`CHANNEL_CAPACITY`] slots (about 100 kB), so none may outlive its
/// subscribers: [`Subscription`] frees its channel when the last subscriber goes, `publish`
/// frees it on the final event or when nobody listens, and `subscribe` sweeps channels whose
/// raw receivers were dropped (callers of [`EventHub::subscribe`]) once the map has doubled
/// since the last sweep, so they are bounded by the live ones.
#[derive(Debug)]
pub struct EventHub {
    channels: Mutex<Channels>,
}

#[derive(Debug)]
struct Channels {
    map: HashMap<Uuid, broadcast::Sender<EngineEvent>>,
    /// Sweep abandoned channels when the map reaches this size.
    sweep_at: usize,
}

/// Events buffered per subscriber; a slower one sees `Lagged` and should re-read the request.
const CHANNEL_CAPACITY: usize = 256;
/// The map is never swept below this size (sweeping is a pass over every channel).
const MIN_SWEEP: usize = 64;

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            channels: Mutex::new(Channels {
                map: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }
}

impl EventHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self, request_id: Uuid) -> broadcast::Receiver<EngineEvent> {
        let mut c = self.lock();
        if c.map.len() >= c.sweep_at {
            c.map.retain(|_, tx| tx.receiver_count() > 0);
            c.sweep_at = (c.map.len() * 2).max(MIN_SWEEP);
        }
        c.map
            .entry(request_id)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe()
    }

    pub fn publish(&self, event: EngineEvent) {
        let mut c = self.lock();
        let id = event.request_id();
        let Some(tx) = c.map.get(&id) else { return };
        let last = event.is_final();
        let _ = tx.send(event);
        if last || tx.receiver_count() == 0 {
            c.map.remove(&id);
        }
    }

    /// Frees the request's channel if nobody listens to it any more.
    pub fn release(&self, request_id: Uuid) {
        let mut c = self.lock();
        if c.map
            .get(&request_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            c.map.remove(&request_id);
        }
    }

    /// Channels held: watched requests, plus any whose raw receivers were dropped since the
    /// last sweep.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests with live subscribers.
    pub fn watched(&self) -> usize {
        self.lock()
            .map
            .values()
            .filter(|tx| tx.receiver_count() > 0)
            .count()
    }
}

/// A subscription to one request's live events that frees the request's channel when it is
/// dropped as its last subscriber.
#[derive(Debug)]
pub struct Subscription {
    rx: Option<broadcast::Receiver<EngineEvent>>,
    request_id: Uuid,
    engine: Engine,
}

impl Subscription {
    fn new(engine: Engine, request_id: Uuid) -> Self {
        let rx = engine.inner.events.subscribe(request_id);
        Subscription {
            rx: Some(rx),
            request_id,
            engine,
        }
    }

    pub fn request_id(&self) -> Uuid {
        self.request_id
    }

    /// The next event; `Lagged` when this subscriber fell behind, `Closed` when the channel
    /// was dropped (the request ended): re-read the request then.
    pub async fn recv(&mut self) -> Result<EngineEvent, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }

    /// Whether the channel was dropped (the request ended).
    pub fn is_closed(&self) -> bool {
        self.rx.as_ref().is_none_or(|rx| rx.is_closed())
    }

    /// Subscribes again (after `Closed`).
    pub fn renew(&mut self) {
        drop(self.rx.take());
        self.rx = Some(self.engine.inner.events.subscribe(self.request_id));
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The receiver first, so the hub sees no subscriber left.
        drop(self.rx.take());
        self.engine.inner.events.release(self.request_id);
    }
}

impl Engine {
    /// Follows an existing request: reads it, subscribes, and reads it again, so no event
    /// between the read and the subscription is lost. Returns the request as it is now and,
    /// unless it has ended, the subscription. An unknown id is [`EngineError::NotFound`] and
    /// allocates nothing.
    pub async fn follow_events(
        &self,
        id: Uuid,
    ) -> Result<(Request, Option<Subscription>), EngineError> {
        let first = self.get_request(id).await?;
        if first.status.is_terminal() {
            return Ok((first, None));
        }
        let sub = Subscription::new(self.clone(), id);
        let current = self.get_request(id).await?;
        if current.status.is_terminal() {
            return Ok((current, None));
        }
        Ok((current, Some(sub)))
    }

    /// Event channels the engine holds now (see [`EventHub::len`]); for tests and metrics.
    pub fn event_channels(&self) -> usize {
        self.inner.events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: Uuid, status: RequestStatus) -> EngineEvent {
        EngineEvent::Status {
            request_id: id,
            status,
            at: Utc::now(),
        }
    }

    #[test]
    fn channels_go_with_their_last_subscriber_or_the_final_event() {
        let hub = EventHub::default();
        let a = Uuid::new_v4();
        let rx1 = hub.subscribe(a);
        let rx2 = hub.subscribe(a);
        assert_eq!(hub.len(), 1);
        drop(rx1);
        hub.release(a);
        assert_eq!(hub.len(), 1, "one subscriber is left");
        drop(rx2);
        hub.release(a);
        assert!(hub.is_empty());

        let mut rx = hub.subscribe(a);
        hub.publish(status(a, RequestStatus::Running));
        assert_eq!(hub.len(), 1);
        hub.publish(status(a, RequestStatus::Completed));
        assert!(hub.is_empty(), "the final event frees the channel");
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn abandoned_receivers_are_swept_so_they_stay_bounded() {
        let hub = EventHub::default();
        let live: Vec<_> = (0..10).map(|_| hub.subscribe(Uuid::new_v4())).collect();
        for _ in 0..10_000 {
            drop(hub.subscribe(Uuid::new_v4()));
        }
        assert!(
            hub.len() <= MIN_SWEEP.max(2 * live.len()) + 1,
            "{}",
            hub.len()
        );
        assert_eq!(hub.watched(), live.len());
    }
}
