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
//! ## Parsing
//!
//! [`Envelope::parse`] is strict about what matters and lenient about the rest. Each failure
//! is a [`ProtocolError`] with its code:
//!
//! | input | code |
//! | --- | --- |
//! | not JSON, or not a JSON object | 5001 `malformed_message` |
//! | `version` an integer other than 1 | 5002 `unsupported_version` |
//! | `message_type` a string that is not a known type | 5003 `unknown_message_type` |
//! | a field missing or mistyped, a bad uuid or timestamp, an empty `text`/`action` | 5004 `invalid_field` |
//! | `progress` outside 0..=100, `attempt` 0, negative `memory_gb` | 5005 `value_out_of_range` |
//!
//! A rejection names its field as a JSON path (`payload.memory.total_gb`,
//! `payload.gpus[0].index`) in its message and in `details.field`. A heartbeat's `cpu` and
//! `memory` are optional (unknown), and `memory` may be written as `{total_gb,
//! available_gb}`, `{total_gb, used_gb}` or `{total_gb, used_percent}`.
//!
//! Unknown fields, in the envelope and in payloads, are ignored and dropped, so newer
//! senders can add fields without breaking older receivers; an unknown `message_type` is
//! still rejected, since a receiver cannot act on a message it does not understand.
//! Floats survive the wire exactly (serde_json's `float_roundtrip`).
//!
//! PROTOCOL.md at the repository root specifies all of this for implementers in other
//! languages; with the `schema` feature, `schema::schemas()` generates the JSON Schemas
//! checked in under `chiffon-protocol/schema/`.
//!
//! ## Error codes
//!
//! Every error anywhere in Chiffon (bus, store, planner, agents, HTTP API, audit) carries a
//! code from one table, documented on [`ErrorCode`] with its name, meaning, HTTP status and
//! whether it is transient, so retry logic asks [`ErrorCode::is_transient`] instead of
//! matching strings.

mod error;
mod message;
#[cfg(feature = "schema")]
pub mod schema;

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
