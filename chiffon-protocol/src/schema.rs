//! JSON Schemas of the envelope and of every payload, generated from the Rust types
//! (feature `schema`). They describe what [`crate::Envelope::parse`] accepts: required
//! fields, types, formats and ranges. `chiffon-protocol/schema/` holds them checked in, and
//! `tests/schema.rs` fails when they drift from the types.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;

use crate::{
    Cancel, Envelope, ErrorPayload, Heartbeat, UserRequest, WorkRequest, WorkResult, WorkStatus,
};

/// Where the schemas are published, as the `$id` prefix.
pub const SCHEMA_BASE: &str = "https://chiffon.invalid/schema/v1/";

fn schema_of<T: JsonSchema>(name: &str, title: &str) -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<T>();
    schema.insert(
        "$id".into(),
        format!("{SCHEMA_BASE}{name}.schema.json").into(),
    );
    schema.insert("title".into(), title.into());
    schema.to_value()
}

/// `(file stem, schema)` for the envelope and each message type's payload, in
/// [`crate::MESSAGE_TYPES`] order after the envelope.
pub fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "envelope",
            schema_of::<Envelope>("envelope", "Chiffon message (envelope with its payload)"),
        ),
        (
            "work_request",
            schema_of::<WorkRequest>("work_request", "work_request payload"),
        ),
        (
            "work_status",
            schema_of::<WorkStatus>("work_status", "work_status payload"),
        ),
        (
            "work_result",
            schema_of::<WorkResult>("work_result", "work_result payload"),
        ),
        ("error", schema_of::<ErrorPayload>("error", "error payload")),
        (
            "user_request",
            schema_of::<UserRequest>("user_request", "user_request payload"),
        ),
        (
            "heartbeat",
            schema_of::<Heartbeat>("heartbeat", "heartbeat payload"),
        ),
        ("cancel", schema_of::<Cancel>("cancel", "cancel payload")),
    ]
}
