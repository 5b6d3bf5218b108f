//! Property tests: any valid envelope of any type survives `to_bytes` → `parse` unchanged,
//! and `parse` never panics, whatever it is given (arbitrary bytes, arbitrary JSON, valid
//! messages with one field replaced by arbitrary JSON); when it rejects, the code is one of
//! the parse codes, and when it accepts, the result is stable under another round trip.

use chiffon_protocol::{
    Cancel, CpuMetrics, Envelope, ErrorCode, ErrorPayload, GpuMetrics, Heartbeat, MemoryMetrics,
    Message, ResourceUsage, Resources, TaskState, UserRequest, WorkRequest, WorkResult, WorkStatus,
    MESSAGE_TYPES, PROTOCOL_VERSION,
};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value};
use uuid::Uuid;

/// The codes `parse` may answer with; anything else from a parser is a bug.
const PARSE_CODES: &[ErrorCode] = &[
    ErrorCode::MalformedMessage,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnknownMessageType,
    ErrorCode::InvalidField,
    ErrorCode::ValueOutOfRange,
];

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// Any instant from 1970 to 9999 (RFC 3339 has four-digit years), to the nanosecond.
fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..=253_402_300_799, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
}

/// Any finite f64, from subnormals to the largest (JSON has no NaN or infinity).
fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        (-1_000_000i64..1_000_000).prop_map(|n| n as f64 / 100.0),
        Just(0.0),
    ]
}

fn non_negative() -> impl Strategy<Value = f64> {
    finite().prop_map(f64::abs)
}

/// Any text a valid message may carry: everything but NUL, which `parse` refuses.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| s.replace('\0', "")),
        "[a-z_ .]{0,12}"
    ]
}

fn non_blank() -> impl Strategy<Value = String> {
    text().prop_filter("not blank", |s| !s.trim().is_empty())
}

fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn json_map() -> BoxedStrategy<Map<String, Value>> {
    prop::collection::btree_map(text(), json_value(), 0..5)
        .prop_map(|m| m.into_iter().collect())
        .boxed()
}

fn task_state() -> impl Strategy<Value = TaskState> {
    prop_oneof![
        Just(TaskState::Accepted),
        Just(TaskState::Running),
        Just(TaskState::Completed),
        Just(TaskState::Failed),
        Just(TaskState::Cancelled),
    ]
}

fn error_payload() -> BoxedStrategy<ErrorPayload> {
    (prop::sample::select(ErrorCode::ALL), text(), json_value())
        .prop_map(|(code, message, details)| ErrorPayload::new(code, message).with_details(details))
        .boxed()
}

fn work_request() -> BoxedStrategy<WorkRequest> {
    (
        non_blank(),
        uuid(),
        non_blank(),
        json_map(),
        (any::<bool>(), non_negative()),
        any::<bool>(),
        1u32..,
        any::<Option<u64>>(),
    )
        .prop_map(
            |(
                agent_type,
                task_id,
                action,
                parameters,
                (gpu, memory_gb),
                dry_run,
                attempt,
                timeout,
            )| {
                WorkRequest {
                    agent_type,
                    task_id,
                    action,
                    parameters,
                    resources_required: Resources { gpu, memory_gb },
                    dry_run,
                    attempt,
                    timeout_seconds: timeout,
                }
            },
        )
        .boxed()
}

fn work_status() -> BoxedStrategy<WorkStatus> {
    (
        uuid(),
        task_state(),
        0u32..=100,
        text(),
        proptest::option::of(json_map()),
        prop::collection::vec(text(), 0..4),
        proptest::option::of(text()),
        proptest::option::of(1u32..),
    )
        .prop_map(
            |(task_id, status, progress, message, metrics, lines, agent_id, attempt)| WorkStatus {
                task_id,
                status,
                progress,
                message,
                metrics,
                lines,
                agent_id,
                attempt,
            },
        )
        .boxed()
}

fn work_result() -> BoxedStrategy<WorkResult> {
    (
        (uuid(), task_state(), text(), finite()),
        (finite(), finite(), proptest::option::of(finite())),
        proptest::option::of(error_payload()),
        any::<Option<bool>>(),
        proptest::option::of(text()),
        1u32..,
        proptest::option::of(text()),
    )
        .prop_map(
            |(
                (task_id, status, output, duration_seconds),
                (cpu_hours, memory_peak_gb, wall_seconds),
                error,
                changed,
                diff,
                attempt,
                agent_id,
            )| WorkResult {
                task_id,
                status,
                output,
                duration_seconds,
                resource_usage: ResourceUsage {
                    cpu_hours,
                    memory_peak_gb,
                    wall_seconds,
                },
                error,
                changed,
                diff,
                attempt,
                agent_id,
            },
        )
        .boxed()
}

fn user_request() -> BoxedStrategy<UserRequest> {
    (non_blank(), proptest::option::of(text()), any::<bool>())
        .prop_map(|(text, requester, dry_run)| UserRequest {
            text,
            requester,
            dry_run,
        })
        .boxed()
}

fn gpu() -> impl Strategy<Value = GpuMetrics> {
    (any::<u32>(), text(), finite(), finite(), finite()).prop_map(
        |(index, name, utilization_percent, memory_used_gb, memory_total_gb)| GpuMetrics {
            index,
            name,
            utilization_percent,
            memory_used_gb,
            memory_total_gb,
        },
    )
}

fn heartbeat() -> BoxedStrategy<Heartbeat> {
    (
        (text(), text(), text()),
        (finite(), any::<u32>(), finite()),
        (finite(), finite()),
        prop::collection::vec(gpu(), 0..3),
        (any::<u32>(), any::<Option<u32>>()),
        proptest::option::of(text()),
        prop::collection::vec(text(), 0..3),
        // An agent may not know its CPU or memory: both are optional.
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (agent_id, agent_type, hostname),
                (percent, cores, load_1m),
                (used_gb, total_gb),
                gpus,
                (running_tasks, max_tasks),
                queue,
                actions,
                (has_cpu, has_memory),
            )| Heartbeat {
                agent_id,
                agent_type,
                hostname,
                cpu: has_cpu.then_some(CpuMetrics {
                    percent,
                    cores,
                    load_1m,
                }),
                memory: has_memory.then_some(MemoryMetrics { used_gb, total_gb }),
                gpus,
                running_tasks,
                max_tasks,
                queue,
                actions,
            },
        )
        .boxed()
}

fn cancel() -> BoxedStrategy<Cancel> {
    (uuid(), proptest::option::of(text()))
        .prop_map(|(task_id, reason)| Cancel { task_id, reason })
        .boxed()
}

fn message() -> BoxedStrategy<Message> {
    prop_oneof![
        work_request().prop_map(Message::WorkRequest),
        work_status().prop_map(Message::WorkStatus),
        work_result().prop_map(Message::WorkResult),
        error_payload().prop_map(Message::Error),
        user_request().prop_map(Message::UserRequest),
        heartbeat().prop_map(Message::Heartbeat),
        cancel().prop_map(Message::Cancel),
    ]
    .boxed()
}

fn envelope() -> BoxedStrategy<Envelope> {
    (
        uuid(),
        text(),
        proptest::option::of(uuid()),
        timestamp(),
        message(),
    )
        .prop_map(
            |(message_id, trace_id, request_id, timestamp, body)| Envelope {
                message_id,
                trace_id,
                request_id,
                timestamp,
                version: PROTOCOL_VERSION,
                body,
            },
        )
        .boxed()
}

/// What any input must satisfy: no panic (the test harness catches one), a parse code on
/// rejection, and a stable round trip on acceptance.
fn check_parse_outcome(
    result: Result<Envelope, chiffon_protocol::ProtocolError>,
) -> Result<(), TestCaseError> {
    match result {
        Err(e) => {
            prop_assert!(PARSE_CODES.contains(&e.code), "unexpected code {}", e.code);
            prop_assert!(!e.message.is_empty());
        }
        Ok(env) => {
            prop_assert_eq!(env.version, PROTOCOL_VERSION);
            let again = Envelope::parse(&env.to_bytes());
            prop_assert_eq!(again.as_ref(), Ok(&env));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_nul_in_any_string_is_refused(env in envelope(), at in any::<prop::sample::Index>()) {
        let mut doc: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        let mut strings = Vec::new();
        collect_strings(&doc, String::new(), &mut strings);
        prop_assume!(!strings.is_empty());
        let pointer = &strings[at.index(strings.len())];
        let s = doc.pointer_mut(pointer).unwrap();
        *s = Value::String(format!("{}\0", s.as_str().unwrap()));
        let e = Envelope::parse(&serde_json::to_vec(&doc).unwrap()).unwrap_err();
        prop_assert!(PARSE_CODES.contains(&e.code), "{:?}", e);
    }

    #[test]
    fn every_envelope_round_trips(env in envelope()) {
        let bytes = env.to_bytes();
        let parsed = Envelope::parse(&bytes);
        prop_assert_eq!(parsed.as_ref(), Ok(&env));
        // The wire form names its type and version as the contract says.
        let wire: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(wire["message_type"].as_str(), Some(env.message_type()));
        prop_assert_eq!(&wire["version"], &Value::from(1));
        prop_assert!(wire["timestamp"].as_str().unwrap().ends_with('Z'));
        // And through a `Value` too, which is how the HTTP layer will hand messages in.
        prop_assert_eq!(Envelope::from_value(wire), Ok(env));
    }

    #[test]
    fn replies_keep_the_conversation(env in envelope(), body in message()) {
        let reply = env.reply(body.clone());
        prop_assert_eq!(&reply.trace_id, &env.trace_id);
        prop_assert_eq!(reply.request_id, env.request_id);
        prop_assert_eq!(&reply.body, &body);
        prop_assert_eq!(Envelope::parse(&reply.to_bytes()), Ok(reply));
    }

    #[test]
    fn parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_parse_outcome(Envelope::parse(&bytes))?;
    }

    #[test]
    fn parse_never_panics_on_near_json_text(s in r#"[{}\[\]":,0-9a-z_ .\-]{0,200}"#) {
        check_parse_outcome(Envelope::parse(s.as_bytes()))?;
    }

    #[test]
    fn parse_never_panics_on_json_values(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        check_parse_outcome(Envelope::parse(&bytes))?;
        check_parse_outcome(Envelope::from_value(value))?;
    }

    /// Arbitrary objects that get past the version and type checks, to reach the payload
    /// validation rather than stop at the first gate.
    #[test]
    fn parse_never_panics_on_plausible_envelopes(
        message_type in prop::sample::select(MESSAGE_TYPES),
        payload in json_value(),
        extra in json_map(),
        request_id in proptest::option::of(uuid()),
    ) {
        let mut obj = extra;
        obj.insert("message_id".into(), Value::from(Uuid::new_v4().to_string()));
        obj.insert("trace_id".into(), Value::from("t"));
        obj.insert("request_id".into(), serde_json::to_value(request_id).unwrap());
        obj.insert("message_type".into(), Value::from(message_type));
        obj.insert("timestamp".into(), Value::from("2026-01-19T12:34:56Z"));
        obj.insert("version".into(), Value::from(1));
        obj.insert("payload".into(), payload);
        check_parse_outcome(Envelope::from_value(Value::Object(obj)))?;
    }

    /// A valid message with one field, at any depth, replaced by arbitrary JSON or removed.
    #[test]
    fn parse_never_panics_on_mutated_messages(
        env in envelope(),
        pick in any::<prop::sample::Index>(),
        replacement in proptest::option::of(json_value()),
    ) {
        let mut doc: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        let mut pointers = Vec::new();
        collect_pointers(&doc, String::new(), &mut pointers);
        let pointer = pick.get(&pointers).clone();
        match replacement {
            Some(v) => *doc.pointer_mut(&pointer).unwrap() = v,
            None => remove(&mut doc, &pointer),
        }
        check_parse_outcome(Envelope::from_value(doc))?;
    }
}

/// JSON pointers of every string value in `v`.
fn collect_strings(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::String(_) => out.push(at),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_strings(x, format!("{at}/{i}"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                collect_strings(x, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

fn collect_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    if !at.is_empty() {
        out.push(at.clone());
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                collect_pointers(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                collect_pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn remove(doc: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let key = key.replace("~1", "/").replace("~0", "~");
    match doc.pointer_mut(parent).unwrap() {
        Value::Object(m) => {
            m.remove(&key);
        }
        Value::Array(a) => {
            a.remove(key.parse::<usize>().unwrap());
        }
        _ => unreachable!("a pointer's parent is a container"),
    }
}
