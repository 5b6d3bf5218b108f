//! Contract tests: the JSON examples of the architecture document (and the contract's three
//! extra message types) parse into the protocol types and serialise back to an equivalent
//! document; every way a message can be wrong is rejected with its code.
//!
//! The architecture document's examples use placeholders (`"uuid"`,
//! `"work_request|work_status|…"`, `"completed|failed"`, `{ ... }`); here they are replaced
//! by concrete values of the same shape. Everything else is copied as written, including
//! integers where the types hold floats (`"memory_gb": 2`, `"duration_seconds": 120`),
//! which is why documents are compared with numbers compared numerically.

use chiffon_protocol::{
    Envelope, ErrorCode, Message, ProtocolError, TaskState, MESSAGE_TYPES, PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use uuid::Uuid;

const MESSAGE_ID: &str = "6f1c2b1e-8d3a-4c55-9a0e-2f7d9b3c4e51";
const REQUEST_ID: &str = "0b8f7e36-2c4d-4a9b-8e1f-5d6c7b8a9f10";
const TASK_ID: &str = "a3d9e2c1-7b6f-4e8d-9c0a-1b2c3d4e5f60";

/// The architecture document's envelope, with its `payload: { ... }` filled in.
fn envelope(message_type: &str, payload: Value) -> Value {
    json!({
        "message_id": MESSAGE_ID,
        "trace_id": "correlation-id",
        "request_id": REQUEST_ID,
        "message_type": message_type,
        "timestamp": "2026-01-19T12:34:56Z",
        "version": 1,
        "payload": payload
    })
}

/// The payload examples of the architecture document, section "Message Protocol".
fn architecture_examples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "work_request",
            json!({
                "agent_type": "infrastructure",
                "task_id": TASK_ID,
                "action": "deploy_kuma",
                "parameters": { "host": "nas", "version": "latest" },
                "resources_required": { "gpu": false, "memory_gb": 2 }
            }),
        ),
        (
            "work_status",
            json!({
                "task_id": TASK_ID,
                "status": "running",
                "progress": 65,
                "message": "Running Ansible playbook...",
                "metrics": { "cpu": 45.2, "memory": 1024 }
            }),
        ),
        (
            "work_result",
            json!({
                "task_id": TASK_ID,
                "status": "completed",
                "output": "...",
                "duration_seconds": 120,
                "resource_usage": { "cpu_hours": 0.5, "memory_peak_gb": 2.1 },
                // Not in the document's example: a result must say which attempt it
                // answers (see `a_result_without_its_attempt_is_refused`).
                "attempt": 1
            }),
        ),
        (
            "work_result",
            json!({
                "task_id": TASK_ID,
                "status": "failed",
                "output": "...",
                "duration_seconds": 120,
                "resource_usage": { "cpu_hours": 0.5, "memory_peak_gb": 2.1 },
                // Not in the document's example: a result must say which attempt it
                // answers (see `a_result_without_its_attempt_is_refused`).
                "attempt": 1
            }),
        ),
        (
            "error",
            json!({
                "code": 5001,
                "message": "...",
                "details": { "raw": "not json" }
            }),
        ),
    ]
}

/// The contract's three extra types, written the way a sender following the contract would.
fn contract_examples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "user_request",
            json!({ "text": "Deploy Uptime Kuma to the NAS", "requester": "alice", "dry_run": true }),
        ),
        (
            "heartbeat",
            json!({
                "agent_id": "infra-nas-1",
                "agent_type": "infrastructure",
                "hostname": "nas",
                "cpu": { "percent": 12.5, "cores": 8, "load_1m": 0.42 },
                "memory": { "used_gb": 3.2, "total_gb": 16 },
                "gpus": [{
                    "index": 0,
                    "name": "NVIDIA GeForce RTX 3090",
                    "utilization_percent": 7,
                    "memory_used_gb": 1.5,
                    "memory_total_gb": 24
                }],
                "running_tasks": 1
            }),
        ),
        ("cancel", json!({ "task_id": TASK_ID })),
        (
            "cancel",
            json!({ "task_id": TASK_ID, "reason": "cancelled by alice" }),
        ),
    ]
}

/// Structural equality where numbers compare by value (`120` equals `120.0`).
fn equivalent(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| equivalent(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| equivalent(v, w)))
        }
        _ => a == b,
    }
}

fn assert_round_trips(doc: &Value) -> Envelope {
    let bytes = serde_json::to_vec(doc).unwrap();
    let env =
        Envelope::parse(&bytes).unwrap_or_else(|e| panic!("example does not parse: {e}\n{doc:#}"));
    let back: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
    assert!(
        equivalent(doc, &back),
        "re-serialised document differs\nexample: {doc:#}\nback:    {back:#}"
    );
    // And the re-serialised form parses to the same value again.
    assert_eq!(Envelope::parse(&env.to_bytes()).unwrap(), env);
    env
}

#[test]
fn equivalence_is_numeric_but_not_lax() {
    assert!(equivalent(&json!({"a": 120}), &json!({"a": 120.0})));
    assert!(equivalent(&json!([1, 2.5]), &json!([1.0, 2.5])));
    assert!(!equivalent(&json!({"a": 120}), &json!({"a": 121.0})));
    assert!(!equivalent(&json!({"a": 1}), &json!({"a": 1, "b": null})));
    assert!(!equivalent(&json!({"a": "1"}), &json!({"a": 1})));
    assert!(!equivalent(&json!([1]), &json!([1, 1])));
}

#[test]
fn architecture_examples_round_trip() {
    for (message_type, payload) in architecture_examples() {
        let env = assert_round_trips(&envelope(message_type, payload));
        assert_eq!(env.message_type(), message_type);
        assert_eq!(env.version, PROTOCOL_VERSION);
        assert_eq!(env.trace_id, "correlation-id");
        assert_eq!(env.request_id, Some(REQUEST_ID.parse().unwrap()));
        assert_eq!(env.message_id, MESSAGE_ID.parse::<Uuid>().unwrap());
        assert_eq!(env.timestamp.to_rfc3339(), "2026-01-19T12:34:56+00:00");
    }
}

#[test]
fn architecture_examples_land_in_the_right_fields() {
    let examples = architecture_examples();
    let parse = |i: usize| {
        let (t, p) = &examples[i];
        Envelope::from_value(envelope(t, p.clone())).unwrap().body
    };
    let task_id: Uuid = TASK_ID.parse().unwrap();
    match parse(0) {
        Message::WorkRequest(w) => {
            assert_eq!(w.agent_type, "infrastructure");
            assert_eq!(w.task_id, task_id);
            assert_eq!(w.action, "deploy_kuma");
            assert_eq!(w.parameters["host"], "nas");
            assert_eq!(w.parameters["version"], "latest");
            assert!(!w.resources_required.gpu);
            assert_eq!(w.resources_required.memory_gb, 2.0);
            // Fields the document does not show take their defaults.
            assert_eq!(w.attempt, 1);
            assert!(!w.dry_run);
            assert_eq!(w.timeout_seconds, None);
        }
        other => panic!("expected a work_request, got {other:?}"),
    }
    match parse(1) {
        Message::WorkStatus(s) => {
            assert_eq!(s.status, TaskState::Running);
            assert_eq!(s.progress, 65);
            assert_eq!(s.message, "Running Ansible playbook...");
            let metrics = s.metrics.unwrap();
            assert_eq!(metrics["cpu"], 45.2);
            assert_eq!(metrics["memory"], 1024);
        }
        other => panic!("expected a work_status, got {other:?}"),
    }
    match (parse(2), parse(3)) {
        (Message::WorkResult(ok), Message::WorkResult(failed)) => {
            assert_eq!(ok.status, TaskState::Completed);
            assert_eq!(failed.status, TaskState::Failed);
            assert_eq!(ok.duration_seconds, 120.0);
            assert_eq!(ok.resource_usage.cpu_hours, 0.5);
            assert_eq!(ok.resource_usage.memory_peak_gb, 2.1);
            assert_eq!(ok.output, "...");
        }
        other => panic!("expected two work_results, got {other:?}"),
    }
    match parse(4) {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::MalformedMessage);
            assert_eq!(e.message, "...");
            assert_eq!(e.details, json!({ "raw": "not json" }));
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn contract_examples_round_trip() {
    for (message_type, payload) in contract_examples() {
        let env = assert_round_trips(&envelope(message_type, payload));
        assert_eq!(env.message_type(), message_type);
    }
    // A heartbeat belongs to no request: `request_id` is null and stays null.
    let mut doc = envelope("heartbeat", contract_examples()[1].1.clone());
    doc["request_id"] = Value::Null;
    let env = assert_round_trips(&doc);
    assert_eq!(env.request_id, None);
    match env.body {
        Message::Heartbeat(h) => {
            assert_eq!(h.memory.as_ref().unwrap().free_gb(), 16.0 - 3.2);
            assert_eq!(h.gpus.len(), 1);
            assert_eq!(h.running_tasks, 1);
        }
        other => panic!("expected a heartbeat, got {other:?}"),
    }
}

#[test]
fn every_message_type_is_covered_by_an_example() {
    let covered: Vec<&str> = architecture_examples()
        .into_iter()
        .chain(contract_examples())
        .map(|(t, _)| t)
        .collect();
    for t in MESSAGE_TYPES {
        assert!(covered.contains(t), "no example of `{t}`");
    }
}

#[test]
fn constructors_stamp_ids_timestamp_and_version_and_replies_carry_ids() {
    let request_id = Uuid::new_v4();
    let first = Envelope::new(
        "trace-7",
        Some(request_id),
        Message::Cancel(chiffon_protocol::Cancel {
            task_id: Uuid::new_v4(),
            reason: None,
        }),
    );
    let reply = first.reply(Message::Error(chiffon_protocol::ErrorPayload::new(
        ErrorCode::TaskCancelled,
        "stopped",
    )));
    assert_eq!(first.version, 1);
    assert_eq!(reply.trace_id, "trace-7");
    assert_eq!(reply.request_id, Some(request_id));
    assert_ne!(reply.message_id, first.message_id);
    assert!(reply.timestamp >= first.timestamp);
    let wire: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
    let ts = wire["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z'), "timestamp {ts} is not UTC");
    chrono::DateTime::parse_from_rfc3339(ts).expect("timestamp is RFC 3339");
    assert_eq!(wire["version"], 1);
    assert_eq!(wire["message_type"], "error");
    assert_eq!(wire["payload"]["code"], 5406);
}

// ---------------------------------------------------------------------------------------
// Rejections, each with its code.

fn valid() -> Value {
    envelope("work_status", architecture_examples()[1].1.clone())
}

fn reject(bytes: &[u8]) -> ProtocolError {
    match Envelope::parse(bytes) {
        Ok(env) => panic!("accepted {:?} as {env:?}", String::from_utf8_lossy(bytes)),
        Err(e) => e,
    }
}

fn reject_value(doc: Value) -> ProtocolError {
    let by_bytes = reject(&serde_json::to_vec(&doc).unwrap());
    let by_value = Envelope::from_value(doc).unwrap_err();
    assert_eq!(by_bytes, by_value, "parse and from_value disagree");
    by_bytes
}

fn with(mut doc: Value, pointer: &str, value: Value) -> Value {
    *doc.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer}")) = value;
    doc
}

fn without(mut doc: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let removed = doc
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .and_then(|o| o.remove(key));
    assert!(removed.is_some(), "no {pointer}");
    doc
}

#[test]
fn the_valid_base_document_parses() {
    // The rejections below are only meaningful if their base is accepted.
    Envelope::from_value(valid()).unwrap();
}

#[test]
fn not_json_or_not_an_object_is_5001() {
    for bytes in [
        &b""[..],
        b"{",
        b"not json",
        b"{\"version\": 1,}",
        b"\xff\xfe{}",
        b"[1, 2]",
        b"\"work_request\"",
        b"42",
        b"null",
        b"true",
    ] {
        let e = reject(bytes);
        assert_eq!(e.code, ErrorCode::MalformedMessage, "{bytes:?}: {e}");
        assert_eq!(e.code.code(), 5001);
    }
}

#[test]
fn wrong_version_is_5002() {
    for version in [json!(0), json!(2), json!(-1), json!(99), json!(u64::MAX)] {
        let e = reject_value(with(valid(), "/version", version.clone()));
        assert_eq!(e.code, ErrorCode::UnsupportedVersion, "{version}: {e}");
        assert_eq!(e.code.code(), 5002);
        assert_eq!(e.details["version"], version);
        assert_eq!(e.details["supported"], json!([1]));
    }
}

#[test]
fn missing_or_mistyped_version_is_5004() {
    let e = reject_value(without(valid(), "/version"));
    assert_eq!(e.code, ErrorCode::InvalidField, "{e}");
    assert_eq!(e.details["field"], "version");
    for version in [json!("1"), json!(1.5), json!(null), json!([1])] {
        let e = reject_value(with(valid(), "/version", version.clone()));
        assert_eq!(e.code, ErrorCode::InvalidField, "{version}: {e}");
        assert_eq!(e.details["field"], "version");
    }
}

#[test]
fn unknown_message_type_is_5003() {
    for t in ["work_order", "WORK_REQUEST", "", "work_request|work_status"] {
        let e = reject_value(with(valid(), "/message_type", json!(t)));
        assert_eq!(e.code, ErrorCode::UnknownMessageType, "{t}: {e}");
        assert_eq!(e.code.code(), 5003);
        assert_eq!(e.details["message_type"], t);
    }
}

#[test]
fn missing_or_mistyped_message_type_is_5004() {
    let e = reject_value(without(valid(), "/message_type"));
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert_eq!(e.details["field"], "message_type");
    let e = reject_value(with(valid(), "/message_type", json!(3)));
    assert_eq!(e.code, ErrorCode::InvalidField);
}

#[test]
fn missing_fields_are_5004() {
    for pointer in [
        "/message_id",
        "/trace_id",
        "/timestamp",
        "/payload",
        "/payload/task_id",
        "/payload/status",
        "/payload/progress",
    ] {
        let e = reject_value(without(valid(), pointer));
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer}: {e}");
        assert_eq!(e.code.code(), 5004);
    }
    // One required field of each other payload.
    let cases = [
        ("work_request", 0, "/payload/action"),
        ("work_request", 0, "/payload/agent_type"),
        ("work_request", 0, "/payload/task_id"),
        ("work_result", 2, "/payload/task_id"),
        ("work_result", 2, "/payload/status"),
        ("error", 4, "/payload/code"),
        ("error", 4, "/payload/message"),
    ];
    let examples = architecture_examples();
    for (t, i, pointer) in cases {
        let e = reject_value(without(envelope(t, examples[i].1.clone()), pointer));
        assert_eq!(e.code, ErrorCode::InvalidField, "{t} {pointer}: {e}");
    }
    let contract = contract_examples();
    for (i, pointer) in [
        (0, "/payload/text"),
        (1, "/payload/agent_id"),
        (1, "/payload/hostname"),
        (1, "/payload/memory/total_gb"),
        (1, "/payload/gpus/0/name"),
        (2, "/payload/task_id"),
    ] {
        let (t, p) = &contract[i];
        let e = reject_value(without(envelope(t, p.clone()), pointer));
        assert_eq!(e.code, ErrorCode::InvalidField, "{t} {pointer}: {e}");
    }
}

#[test]
fn mistyped_fields_are_5004() {
    for (pointer, value) in [
        ("/trace_id", json!(17)),
        ("/request_id", json!(42)),
        ("/payload", json!("running")),
        ("/payload", json!([])),
        ("/payload/status", json!("exploded")),
        ("/payload/status", json!(1)),
        ("/payload/progress", json!("65")),
        ("/payload/progress", json!(65.5)),
        ("/payload/message", json!(["a"])),
        ("/payload/metrics", json!("cpu=45")),
    ] {
        let e = reject_value(with(valid(), pointer, value.clone()));
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer} = {value}: {e}");
    }
    let request = envelope("work_request", architecture_examples()[0].1.clone());
    for (pointer, value) in [
        ("/payload/parameters", json!(["host", "nas"])),
        ("/payload/resources_required/gpu", json!("no")),
        ("/payload/resources_required/memory_gb", json!("2GB")),
        ("/payload/action", json!(null)),
    ] {
        let e = reject_value(with(request.clone(), pointer, value.clone()));
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer} = {value}: {e}");
    }
    // An error payload whose code is not in the table, or not a code at all.
    let error = envelope("error", architecture_examples()[4].1.clone());
    for code in [json!(5999), json!(4000), json!("5001"), json!(-1)] {
        let e = reject_value(with(error.clone(), "/payload/code", code.clone()));
        assert_eq!(e.code, ErrorCode::InvalidField, "code {code}: {e}");
    }
}

#[test]
fn bad_uuids_are_5004() {
    for (pointer, value) in [
        ("/message_id", "uuid-v4"),
        ("/message_id", ""),
        ("/request_id", "original-request-uuid"),
        ("/payload/task_id", "uuid"),
        ("/payload/task_id", "a3d9e2c1-7b6f-4e8d-9c0a-1b2c3d4e5f6"),
    ] {
        let e = reject_value(with(valid(), pointer, json!(value)));
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer} = {value}: {e}");
    }
}

#[test]
fn bad_timestamps_are_5004() {
    for ts in [
        json!("yesterday"),
        json!("2026-01-19"),
        json!("2026-01-19 12:34:56"),
        json!("2026-01-19T12:34:56"), // no offset: not RFC 3339
        json!("2026-13-19T12:34:56Z"),
        json!("2026-01-19T25:34:56Z"),
        json!(1768826096),
        json!(null),
    ] {
        let e = reject_value(with(valid(), "/timestamp", ts.clone()));
        assert_eq!(e.code, ErrorCode::InvalidField, "{ts}: {e}");
    }
}

#[test]
fn timestamps_with_an_offset_are_read_as_utc() {
    let env = Envelope::from_value(with(
        valid(),
        "/timestamp",
        json!("2026-01-19T14:34:56.25+02:00"),
    ))
    .unwrap();
    assert_eq!(env.timestamp.to_rfc3339(), "2026-01-19T12:34:56.250+00:00");
}

#[test]
fn progress_outside_0_to_100_is_5005() {
    for progress in [
        json!(101),
        json!(1000),
        json!(-1),
        json!(1e12),
        json!(100.5),
        json!(u64::MAX),
    ] {
        let e = reject_value(with(valid(), "/payload/progress", progress.clone()));
        assert_eq!(e.code, ErrorCode::ValueOutOfRange, "{progress}: {e}");
        assert_eq!(e.code.code(), 5005);
        assert_eq!(e.details["field"], "payload.progress");
    }
    for progress in [0, 1, 99, 100] {
        let env =
            Envelope::from_value(with(valid(), "/payload/progress", json!(progress))).unwrap();
        match env.body {
            Message::WorkStatus(s) => assert_eq!(s.progress, progress),
            other => panic!("expected a work_status, got {other:?}"),
        }
    }
}

#[test]
fn other_out_of_range_values_are_5005() {
    let request = envelope("work_request", architecture_examples()[0].1.clone());
    let e = reject_value(with(
        request.clone(),
        "/payload/resources_required/memory_gb",
        json!(-2),
    ));
    assert_eq!(e.code, ErrorCode::ValueOutOfRange, "{e}");
    let mut zero_attempt = request;
    zero_attempt["payload"]["attempt"] = json!(0);
    let e = reject_value(zero_attempt);
    assert_eq!(e.code, ErrorCode::ValueOutOfRange, "{e}");
}

#[test]
fn empty_text_and_names_are_5004() {
    for text in ["", "   ", "\n\t"] {
        let doc = envelope(
            "user_request",
            json!({ "text": text, "requester": "alice" }),
        );
        let e = reject_value(doc);
        assert_eq!(e.code, ErrorCode::InvalidField, "{text:?}: {e}");
        assert_eq!(e.details["field"], "payload.text");
    }
    let request = envelope("work_request", architecture_examples()[0].1.clone());
    for pointer in ["/payload/action", "/payload/agent_type"] {
        let e = reject_value(with(request.clone(), pointer, json!("")));
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer}: {e}");
    }
}

#[test]
fn errors_display_their_code_and_convert_to_an_error_payload() {
    let e = reject(b"[]");
    assert!(e.to_string().starts_with("5001 malformed_message: "), "{e}");
    let payload = chiffon_protocol::ErrorPayload::from(e.clone());
    assert_eq!(payload.code, e.code);
    assert_eq!(payload.message, e.message);
    // An error can itself travel as an `error` message and come back intact.
    let env = Envelope::new("t", None, Message::Error(payload.clone()));
    assert_eq!(
        Envelope::parse(&env.to_bytes()).unwrap().body,
        Message::Error(payload)
    );
}

// ---------------------------------------------------------------------------------------
// Forward compatibility: unknown fields are tolerated and dropped; unknown types are not.

#[test]
fn unknown_fields_are_accepted_and_dropped() {
    let examples = architecture_examples()
        .into_iter()
        .chain(contract_examples());
    for (t, payload) in examples {
        let original = envelope(t, payload);
        let mut extended = original.clone();
        extended["priority"] = json!("high");
        extended["routing"] = json!({ "hops": [1, 2, 3] });
        extended["payload"]["added_in_v1_1"] = json!({ "nested": true });
        extended["payload"]["x"] = json!(null);
        let env = Envelope::from_value(extended)
            .unwrap_or_else(|e| panic!("{t} with extra fields rejected: {e}"));
        assert_eq!(env, Envelope::from_value(original.clone()).unwrap());
        let back: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert!(
            equivalent(&back, &original),
            "{t}: unknown fields were not dropped: {back:#}"
        );
    }
    // Nested payload objects tolerate them too.
    let mut doc = envelope("heartbeat", contract_examples()[1].1.clone());
    doc["payload"]["cpu"]["temperature_c"] = json!(61);
    doc["payload"]["gpus"][0]["driver"] = json!("550.54");
    Envelope::from_value(doc).unwrap();
}

#[test]
fn unknown_message_type_is_still_rejected_with_unknown_fields() {
    let mut doc = valid();
    doc["message_type"] = json!("work_pause");
    doc["added_in_v2"] = json!(true);
    let e = reject_value(doc);
    assert_eq!(e.code, ErrorCode::UnknownMessageType);
    // Nor does tolerance extend to a payload of one type sent under another's name.
    let doc = envelope("cancel", architecture_examples()[4].1.clone());
    assert_eq!(reject_value(doc).code, ErrorCode::InvalidField);
}

#[test]
fn deep_nesting_is_bounded_not_a_crash() {
    // serde_json stops at 128 levels: a hostile message is rejected, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = serde_json::to_string(&valid())
        .unwrap()
        .replace("\"Running Ansible playbook...\"", &deep);
    assert_eq!(reject(text.as_bytes()).code, ErrorCode::MalformedMessage);
    // Just under the limit, in a field that takes any JSON, it is accepted.
    let nested = format!("{}{}", "[".repeat(120), "]".repeat(120));
    let mut doc = envelope("work_request", architecture_examples()[0].1.clone());
    doc["payload"]["parameters"]["deep"] = serde_json::from_str(&nested).unwrap();
    let env = Envelope::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
    assert_eq!(Envelope::parse(&env.to_bytes()).unwrap(), env);
}

#[test]
fn a_result_without_its_attempt_is_refused() {
    let mut doc = envelope("work_result", architecture_examples()[2].1.clone());
    doc["payload"].as_object_mut().unwrap().remove("attempt");
    let e = reject_value(doc.clone());
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.contains("attempt"), "{}", e.message);
    doc["payload"]["attempt"] = json!(0);
    assert_eq!(reject_value(doc).code, ErrorCode::ValueOutOfRange);
}

#[test]
fn a_nul_character_anywhere_is_refused_and_named() {
    let examples = architecture_examples();
    for (pointer, doc) in [
        ("payload.message", {
            let mut d = envelope("work_status", examples[1].1.clone());
            d["payload"]["message"] = json!("a\u{0}b");
            d
        }),
        ("payload.parameters.host", {
            let mut d = envelope("work_request", examples[0].1.clone());
            d["payload"]["parameters"]["host"] = json!("nas\u{0}");
            d
        }),
        ("trace_id", {
            let mut d = envelope("work_result", examples[2].1.clone());
            d["trace_id"] = json!("\u{0}");
            d
        }),
        ("payload.lines[1]", {
            let mut d = envelope("work_status", examples[1].1.clone());
            d["payload"]["lines"] = json!(["ok", "x\u{0}"]);
            d
        }),
    ] {
        let e = reject_value(doc);
        assert_eq!(e.code, ErrorCode::InvalidField, "{pointer}");
        assert_eq!(e.details["field"], pointer, "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Tolerance where the protocol can afford it, and rejections that name their field.

fn heartbeat_with(memory: Option<Value>) -> Value {
    let mut doc = envelope("heartbeat", contract_examples()[1].1.clone());
    doc["request_id"] = Value::Null;
    match memory {
        Some(m) => doc["payload"]["memory"] = m,
        None => {
            doc["payload"].as_object_mut().unwrap().remove("memory");
        }
    }
    doc
}

fn memory_of(doc: Value) -> Option<chiffon_protocol::MemoryMetrics> {
    match Envelope::from_value(doc).unwrap().body {
        Message::Heartbeat(h) => h.memory,
        other => panic!("expected a heartbeat, got {other:?}"),
    }
}

#[test]
fn heartbeat_resources_are_optional() {
    let mut doc = heartbeat_with(None);
    let payload = doc["payload"].as_object_mut().unwrap();
    for f in ["cpu", "gpus", "running_tasks"] {
        payload.remove(f);
    }
    let env = Envelope::from_value(doc).unwrap();
    let Message::Heartbeat(h) = &env.body else {
        panic!("{env:?}")
    };
    assert_eq!((h.cpu.as_ref(), h.memory.as_ref()), (None, None));
    assert!(h.gpus.is_empty());
    assert_eq!(h.running_tasks, 0);
    // Unknown stays unknown on the way out: no field rather than made-up zeros.
    let wire: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
    assert!(wire["payload"].get("memory").is_none() && wire["payload"].get("cpu").is_none());
    assert_eq!(Envelope::parse(&env.to_bytes()).unwrap(), env);
}

#[test]
fn memory_may_be_given_as_available_used_or_percent() {
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 16, "available_gb": 12 }),
    )))
    .unwrap();
    assert_eq!((m.used_gb, m.total_gb, m.free_gb()), (4.0, 16.0, 12.0));
    // Available wins when both are given: it is what a new task can use (caches count as
    // used in `used_gb` on some systems).
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 16, "used_gb": 10, "available_gb": 12 }),
    )))
    .unwrap();
    assert_eq!(m.free_gb(), 12.0);
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 16, "used_gb": 10 }),
    )))
    .unwrap();
    assert_eq!(m.free_gb(), 6.0);
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 16, "used_percent": 25 }),
    )))
    .unwrap();
    assert_eq!(m.used_gb, 4.0);
    // The architecture document's Python agent sent exactly this; it dead-lettered every
    // heartbeat before.
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 31.2, "available_gb": 20.0, "used_percent": 35.9 }),
    )))
    .unwrap();
    assert!((m.free_gb() - 20.0).abs() < 1e-9, "{m:?}");
    // More available than there is: nothing used, not a negative figure.
    let m = memory_of(heartbeat_with(Some(
        json!({ "total_gb": 8, "available_gb": 9 }),
    )))
    .unwrap();
    assert_eq!(m.used_gb, 0.0);
}

#[test]
fn memory_without_a_usage_figure_is_refused_and_named() {
    for memory in [
        json!({ "total_gb": 16 }),
        json!({ "total_gb": 16, "used_percent": 250 }),
        json!({ "total_gb": "16", "used_gb": 1 }),
        json!({ "available_gb": 3 }),
    ] {
        let e = reject_value(heartbeat_with(Some(memory.clone())));
        assert_eq!(e.code, ErrorCode::InvalidField, "{memory}: {e}");
        let field = e.details["field"].as_str().unwrap();
        assert!(field.starts_with("payload.memory"), "{memory}: {field}");
        assert!(e.message.contains(field), "{e}");
    }
    let e = reject_value(heartbeat_with(Some(json!({ "available_gb": 3 }))));
    assert_eq!(e.details["field"], "payload.memory.total_gb", "{e:?}");
}

#[test]
fn a_rejected_field_is_named_by_its_json_path() {
    let examples = architecture_examples();
    let contract = contract_examples();
    for (doc, field) in [
        (
            without(
                envelope("work_result", examples[2].1.clone()),
                "/payload/attempt",
            ),
            "payload.attempt",
        ),
        (
            with(
                envelope("work_result", examples[2].1.clone()),
                "/payload/resource_usage/cpu_hours",
                json!("0.5"),
            ),
            "payload.resource_usage.cpu_hours",
        ),
        (
            with(
                envelope(contract[1].0, contract[1].1.clone()),
                "/payload/gpus/0/index",
                json!(-1),
            ),
            "payload.gpus[0].index",
        ),
        (
            without(
                envelope(contract[1].0, contract[1].1.clone()),
                "/payload/cpu/cores",
            ),
            "payload.cpu.cores",
        ),
        (without(valid(), "/trace_id"), "trace_id"),
        (with(valid(), "/message_id", json!("nope")), "message_id"),
        (without(valid(), "/payload"), "payload"),
        (with(valid(), "/payload", json!("running")), "payload"),
        (
            with(valid(), "/payload/status", json!("exploded")),
            "payload.status",
        ),
    ] {
        let e = reject_value(doc);
        assert_eq!(e.code, ErrorCode::InvalidField, "{field}: {e}");
        assert_eq!(e.details["field"], field, "{e:?}");
        assert!(e.message.contains(&format!("`{field}`")), "{e}");
    }
}
