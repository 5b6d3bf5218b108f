//! # chiffon-protocol
//!
//! The messages Chiffon's orchestrator, agents and frontends exchange over the bus, and the
//! error codes every part of Chiffon reports. Pure data: no I/O, no async runtime, so any
//! program (an agent in another language's test harness, a chat bot) can depend on it.
//!
//! - [`Envelope`]: `message_id`, `trace_id`, `request_id`, `message_type`, `timestamp`
//!   (RFC 3339, UTC), `version` (always 1) and a typed [`Message`] payload.
//! - Payloads: [`WorkRequest`], [`WorkStatus`], [`WorkResult`], [`ErrorPayload`],
//!   [`UserRequest`], [`Heartbeat`], [`Cancel`].
//! - [`ErrorCode`]: the 5001-5999 table, with names, meanings, HTTP statuses and whether
//!   each is transient.
//!
//! ```
//! use chiffon_protocol::{Envelope, Message, UserRequest};
//!
//! let msg = Envelope::new("trace-1", None, Message::UserRequest(UserRequest {
//!     text: "Deploy Uptime Kuma to the NAS".into(),
//!     requester: Some("alice".into()),
//!     dry_run: false,
//! }));
//! let parsed = Envelope::parse(&msg.to_bytes()).unwrap();
//! assert_eq!(parsed, msg);
//! assert_eq!(parsed.version, 1);
//! ```
//!
//! Parsing is strict about what matters (version, type, required fields, ranges: each
//! failure is a [`ProtocolError`] with its code) and lenient about the rest: unknown fields
//! are ignored, so newer senders can add fields without breaking older receivers.

mod error;
mod message;

pub use error::ErrorCode;
pub use message::*;

use serde_json::Value;

/// A message failed to parse or validate. Carries the code to answer with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            details: Value::Object(Default::default()),
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    fn field(field: &str, message: &str) -> Self {
        ProtocolError::new(ErrorCode::InvalidField, message)
            .with_details(serde_json::json!({ "field": field }))
    }
}
