//! Messages the engine dead-lettered for their content or their publisher, kept per sender
//! so that a misbehaving agent is visible (`GET /agents` lists them) and is logged at most
//! once a minute, not once per heartbeat.
//!
//! A sender is the pair (agent id, broker user) as far as either can be read: an agent
//! that writes its heartbeat wrong still names itself in `payload.agent_id`. The list is
//! this instance's (in memory, bounded); an entry is dropped once that sender's messages
//! are accepted again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chiffon_protocol::{Envelope, ProtocolError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Engine;
use crate::transport::Delivery;

/// How often one sender's rejections are logged.
pub const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Senders remembered at most; the least recently rejected is forgotten first.
const MAX_SENDERS: usize = 1000;

/// The latest rejection of one sender's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedMessage {
    /// `payload.agent_id` of the message, when it could be read.
    pub agent_id: Option<String>,
    /// The broker user that published it (`user_id`), when given.
    pub publisher: Option<String>,
    /// `message_type` of the message, when it could be read.
    pub message_type: Option<String>,
    /// The error code (5001-5999): why it was refused.
    pub code: u16,
    /// The field at fault, as a JSON path (`payload.memory.total_gb`), when one is.
    pub field: Option<String>,
    pub reason: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// Messages of this sender rejected since `first_at`.
    pub count: u64,
}

type Sender = (Option<String>, Option<String>);
/// A sender's latest rejection, when it was last logged, and rejections not logged since.
type Entry = (RejectedMessage, Option<Instant>, u64);

#[derive(Default)]
pub(super) struct RejectedLog {
    senders: Mutex<HashMap<Sender, Entry>>,
}

impl RejectedLog {
    /// Records a rejection; `Some(n)` when it should be logged now, `n` being how many of
    /// this sender's rejections went unlogged since the last line.
    fn note(&self, mut r: RejectedMessage) -> Option<u64> {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        let key = (r.agent_id.clone(), r.publisher.clone());
        if !senders.contains_key(&key) && senders.len() >= MAX_SENDERS {
            if let Some(oldest) = senders
                .iter()
                .min_by_key(|(_, (m, _, _))| m.last_at)
                .map(|(k, _)| k.clone())
            {
                senders.remove(&oldest);
            }
        }
        let now = Instant::now();
        let (entry, logged_at, unlogged) =
            senders.entry(key).or_insert_with(|| (r.clone(), None, 0));
        if logged_at.is_some() {
            r.first_at = entry.first_at;
            r.count = entry.count + 1;
        }
        *entry = r;
        match logged_at {
            Some(at) if now.duration_since(*at) < REJECTION_LOG_INTERVAL => {
                *unlogged += 1;
                None
            }
            _ => {
                *logged_at = Some(now);
                Some(std::mem::take(unlogged))
            }
        }
    }

    /// Forgets a sender's rejected heartbeats (and messages of no readable type) once one of
    /// its heartbeats is accepted; a refused result stays listed until it is evicted.
    fn forget_heartbeats(&self, agent_id: &str, publisher: &str) {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if senders.is_empty() {
            return;
        }
        senders.retain(|(a, p), (m, _, _)| {
            !(a.as_deref() == Some(agent_id)
                && p.as_deref() == Some(publisher)
                && matches!(m.message_type.as_deref(), None | Some("heartbeat")))
        });
    }

    fn list(&self) -> Vec<RejectedMessage> {
        let senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<RejectedMessage> = senders.values().map(|(m, _, _)| m.clone()).collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.last_at));
        out
    }
}

/// `message_type` and `payload.agent_id` of a message that may not parse.
fn peek(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(|s| s.chars().take(200).collect())
    };
    (
        text(v.get("message_type")),
        text(v.get("payload").and_then(|p| p.get("agent_id"))),
    )
}

impl Engine {
    /// Messages this instance dead-lettered, newest first: one entry per sender (agent id,
    /// broker user) with its latest reason, while that sender's messages keep failing.
    pub fn rejected_messages(&self) -> Vec<RejectedMessage> {
        self.inner.rejected.list()
    }

    /// A message that does not parse: recorded, and logged at most once a minute per sender.
    pub(super) fn note_unparsable(&self, d: &Delivery, e: &ProtocolError) {
        let (message_type, agent_id) = peek(&d.body);
        let now = Utc::now();
        let r = RejectedMessage {
            agent_id,
            publisher: d.publisher.clone(),
            message_type,
            code: e.code.code(),
            field: e
                .details
                .get("field")
                .and_then(Value::as_str)
                .map(str::to_string),
            reason: e.message.clone(),
            first_at: now,
            last_at: now,
            count: 1,
        };
        if let Some(unlogged) = self.inner.rejected.note(r.clone()) {
            tracing::warn!(
                code = r.code,
                publisher = r.publisher.as_deref().unwrap_or("-"),
                agent_id = r.agent_id.as_deref().unwrap_or("-"),
                message_type = r.message_type.as_deref().unwrap_or("-"),
                field = r.field.as_deref().unwrap_or("-"),
                unlogged,
                error = %e,
                "unparsable message dead-lettered (logged at most once a minute per sender; GET /agents lists it)"
            );
        }
    }

    /// A parsed message refused for its publisher: recorded; whether to log it now.
    pub(super) fn note_refused(
        &self,
        d: &Delivery,
        env: &Envelope,
        code: u16,
        why: &str,
    ) -> Option<u64> {
        let agent_id = match &env.body {
            chiffon_protocol::Message::Heartbeat(h) => Some(h.agent_id.clone()),
            chiffon_protocol::Message::WorkStatus(s) => s.agent_id.clone(),
            chiffon_protocol::Message::WorkResult(r) => r.agent_id.clone(),
            _ => None,
        };
        let now = Utc::now();
        self.inner.rejected.note(RejectedMessage {
            agent_id,
            publisher: d.publisher.clone(),
            message_type: Some(env.message_type().to_string()),
            code,
            field: None,
            reason: why.to_string(),
            first_at: now,
            last_at: now,
            count: 1,
        })
    }

    /// A heartbeat was accepted: its sender is no longer failing.
    pub(super) fn note_accepted(&self, agent_id: &str, publisher: &str) {
        self.inner.rejected.forget_heartbeats(agent_id, publisher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(agent: &str) -> RejectedMessage {
        RejectedMessage {
            agent_id: Some(agent.into()),
            publisher: Some("py".into()),
            message_type: Some("heartbeat".into()),
            code: 5004,
            field: Some("payload.memory".into()),
            reason: "bad".into(),
            first_at: Utc::now(),
            last_at: Utc::now(),
            count: 1,
        }
    }

    #[test]
    fn one_line_a_minute_per_sender_and_counted() {
        let log = RejectedLog::default();
        assert_eq!(log.note(rejection("a")), Some(0));
        for _ in 0..29 {
            assert_eq!(log.note(rejection("a")), None);
        }
        // Another sender is logged at once.
        assert_eq!(log.note(rejection("b")), Some(0));
        let list = log.list();
        assert_eq!(list.len(), 2);
        let a = list
            .iter()
            .find(|r| r.agent_id.as_deref() == Some("a"))
            .unwrap();
        assert_eq!(a.count, 30);
        assert!(a.first_at <= a.last_at);
        // Accepted again: forgotten; a refused result of the same sender stays listed.
        let mut result = rejection("b");
        result.message_type = Some("work_result".into());
        log.note(result);
        log.forget_heartbeats("a", "py");
        log.forget_heartbeats("b", "py");
        let left = log.list();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].message_type.as_deref(), Some("work_result"));
    }

    #[test]
    fn bounded() {
        let log = RejectedLog::default();
        for i in 0..(MAX_SENDERS + 10) {
            log.note(rejection(&i.to_string()));
        }
        assert_eq!(log.list().len(), MAX_SENDERS);
    }

    #[test]
    fn peeks_into_messages_that_do_not_parse() {
        let body =
            br#"{"message_type": "heartbeat", "payload": {"agent_id": "py-1", "memory": {}}}"#;
        assert_eq!(peek(body), (Some("heartbeat".into()), Some("py-1".into())));
        assert_eq!(peek(b"not json"), (None, None));
    }
}
