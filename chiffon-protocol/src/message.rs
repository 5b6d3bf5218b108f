//! The message envelope and its payloads.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{ErrorCode, ProtocolError};

/// The only envelope version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every message on the bus: ids, a timestamp, the version, and one typed payload.
///
/// On the wire the payload's kind is `message_type` and its body is `payload`:
///
/// ```json
/// {"message_id": "…", "trace_id": "…", "request_id": "…", "message_type": "work_request",
///  "timestamp": "2026-01-19T12:34:56Z", "version": 1, "payload": { … }}
/// ```
///
/// Unknown fields, in the envelope and in payloads, are **tolerated and dropped** so that a
/// newer sender can add fields without breaking older receivers (forward compatibility).
/// A different `version` or an unknown `message_type` is rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Envelope {
    pub message_id: Uuid,
    /// Correlates every message, log line and audit entry of one user request.
    pub trace_id: String,
    /// The user request this message belongs to (`null` for heartbeats).
    #[cfg_attr(feature = "schema", schemars(default))]
    pub request_id: Option<Uuid>,
    /// RFC 3339 with an offset (`Z` when sent by Chiffon); read as UTC.
    pub timestamp: DateTime<Utc>,
    /// Always 1 (see PROTOCOL.md, "Versioning").
    #[cfg_attr(feature = "schema", schemars(extend("const" = 1)))]
    pub version: u32,
    #[serde(flatten)]
    pub body: Message,
}

/// The payload of an [`Envelope`], tagged by `message_type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "message_type", content = "payload", rename_all = "snake_case")]
pub enum Message {
    WorkRequest(WorkRequest),
    WorkStatus(WorkStatus),
    WorkResult(WorkResult),
    Error(ErrorPayload),
    UserRequest(UserRequest),
    Heartbeat(Heartbeat),
    Cancel(Cancel),
}

impl Message {
    /// The wire name of this payload's type.
    pub fn message_type(&self) -> &'static str {
        match self {
            Message::WorkRequest(_) => "work_request",
            Message::WorkStatus(_) => "work_status",
            Message::WorkResult(_) => "work_result",
            Message::Error(_) => "error",
            Message::UserRequest(_) => "user_request",
            Message::Heartbeat(_) => "heartbeat",
            Message::Cancel(_) => "cancel",
        }
    }
}

/// The message types this build knows.
pub const MESSAGE_TYPES: &[&str] = &[
    "work_request",
    "work_status",
    "work_result",
    "error",
    "user_request",
    "heartbeat",
    "cancel",
];

/// Resources a step needs from the agent that runs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Resources {
    #[serde(default)]
    pub gpu: bool,
    /// GiB; 0 or more.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0)))]
    pub memory_gb: f64,
}

/// Orchestrator → agent: run one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkRequest {
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub agent_type: String,
    pub task_id: Uuid,
    /// A catalog action's name.
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub action: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub resources_required: Resources,
    /// Run in check mode: report what would change, change nothing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// 1 for the first try; retries count up.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub attempt: u32,
    /// The agent stops the task after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// The state a task reports in `work_status` and `work_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Accepted,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Accepted => "accepted",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// Agent → orchestrator, during execution: progress and output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkStatus {
    pub task_id: Uuid,
    pub status: TaskState,
    /// Percent done, 0..=100 (checked by [`Envelope::parse`]).
    #[cfg_attr(feature = "schema", schemars(range(max = 100)))]
    pub progress: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Map<String, Value>>,
    /// Output lines produced since the previous status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The `attempt` of the `work_request` this reports on. Optional here (a status of an
    /// older attempt is ignored when it is given); required in `work_result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// What running a task cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceUsage {
    #[serde(default)]
    pub cpu_hours: f64,
    #[serde(default)]
    pub memory_peak_gb: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
}

/// Agent → orchestrator, once: the task's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkResult {
    pub task_id: Uuid,
    pub status: TaskState,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub duration_seconds: f64,
    #[serde(default)]
    pub resource_usage: ResourceUsage,
    /// Set when `status` is `failed` or `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorPayload>,
    /// Whether the action changed anything (Ansible's `changed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// The diff of a check-mode (dry) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// The `attempt` of the `work_request` this answers. Required: a result that does not
    /// say which attempt it answers is refused, never taken for the first one.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// Any service → any service: something went wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorPayload {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default = "empty_object")]
    pub details: Value,
}

impl ErrorPayload {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorPayload {
            code,
            message: message.into(),
            details: empty_object(),
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

impl From<ProtocolError> for ErrorPayload {
    fn from(e: ProtocolError) -> Self {
        ErrorPayload {
            code: e.code,
            message: e.message,
            details: e.details,
        }
    }
}

/// Any frontend → `orchestrator.requests`: a request in plain words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UserRequest {
    /// The request in plain words; not blank.
    #[cfg_attr(feature = "schema", schemars(length(min = 1), regex(pattern = r"\S")))]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// CPU figures of a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CpuMetrics {
    /// Overall use, 0-100.
    pub percent: f64,
    pub cores: u32,
    #[serde(default)]
    pub load_1m: f64,
}

/// Memory figures of a heartbeat, in GiB.
///
/// Sent as `{"used_gb", "total_gb"}`. Read tolerantly: `total_gb` and one of
/// `available_gb` (preferred when both are given: it is what a new task can use), `used_gb`
/// or `used_percent` (0-100 of `total_gb`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MemoryWire")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MemoryMetrics {
    pub used_gb: f64,
    pub total_gb: f64,
}

/// How a heartbeat's `memory` may be written (see [`MemoryMetrics`]).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("anyOf" = [
        { "required": ["available_gb"] },
        { "required": ["used_gb"] },
        { "required": ["used_percent"] }
    ]))
)]
struct MemoryWire {
    total_gb: f64,
    #[serde(default)]
    available_gb: Option<f64>,
    #[serde(default)]
    used_gb: Option<f64>,
    /// Used only when neither `available_gb` nor `used_gb` is given; then 0-100.
    #[serde(default)]
    used_percent: Option<f64>,
}

impl TryFrom<MemoryWire> for MemoryMetrics {
    type Error = String;

    fn try_from(w: MemoryWire) -> Result<Self, String> {
        let used_gb = match (w.available_gb, w.used_gb, w.used_percent) {
            (Some(available), _, _) => (w.total_gb - available).max(0.0),
            (None, Some(used), _) => used,
            (None, None, Some(p)) if (0.0..=100.0).contains(&p) => w.total_gb * p / 100.0,
            (None, None, Some(p)) => return Err(format!("used_percent {p} is outside 0..=100")),
            (None, None, None) => {
                return Err(
                    "memory needs `available_gb`, `used_gb` or `used_percent` besides `total_gb`"
                        .into(),
                )
            }
        };
        Ok(MemoryMetrics {
            used_gb,
            total_gb: w.total_gb,
        })
    }
}

impl MemoryMetrics {
    pub fn free_gb(&self) -> f64 {
        (self.total_gb - self.used_gb).max(0.0)
    }
}

/// One GPU of a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GpuMetrics {
    pub index: u32,
    pub name: String,
    pub utilization_percent: f64,
    pub memory_used_gb: f64,
    pub memory_total_gb: f64,
}

/// Agent → `orchestrator.results`, periodically: who it is and what it has free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Heartbeat {
    pub agent_id: String,
    pub agent_type: String,
    pub hostname: String,
    /// Absent: unknown. An agent whose memory is unknown gets only steps that need no
    /// memory and no GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryMetrics>,
    #[serde(default)]
    pub gpus: Vec<GpuMetrics>,
    #[serde(default)]
    pub running_tasks: u32,
    /// How many tasks it runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<u32>,
    /// The queue it consumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The actions it accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
}

/// Orchestrator → every agent through `chiffon.control`: stop this task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Cancel {
    pub task_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A `work_status` progress that is a number outside 0..=100 (negative, or too large for the
/// field's integer type) is out of range (5005), not mistyped: serde alone would report
/// -5 or 1e12 as a type error (5004). A fractional value inside the range stays 5004.
fn check_progress(obj: &Map<String, Value>) -> Result<(), ProtocolError> {
    if obj.get("message_type").and_then(Value::as_str) != Some("work_status") {
        return Ok(());
    }
    let Some(Value::Number(n)) = obj.get("payload").and_then(|p| p.get("progress")) else {
        return Ok(());
    };
    let in_range = match (n.as_u64(), n.as_i64(), n.as_f64()) {
        (Some(u), _, _) => u <= 100,
        (None, Some(_), _) => false,
        (None, None, Some(f)) => (0.0..=100.0).contains(&f),
        (None, None, None) => true,
    };
    if in_range {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::ValueOutOfRange,
            format!("progress {n} is outside 0..=100"),
        )
        .with_details(serde_json::json!({ "field": "payload.progress", "value": n })))
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}
fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl Envelope {
    /// A new message: fresh `message_id`, `timestamp` now (UTC, whole microseconds), version 1.
    pub fn new(trace_id: impl Into<String>, request_id: Option<Uuid>, body: Message) -> Self {
        Envelope {
            message_id: Uuid::new_v4(),
            trace_id: trace_id.into(),
            request_id,
            timestamp: Utc::now().trunc_subsecs(6),
            version: PROTOCOL_VERSION,
            body,
        }
    }

    /// A new message in the same conversation: same trace and request ids.
    pub fn reply(&self, body: Message) -> Self {
        Envelope::new(self.trace_id.clone(), self.request_id, body)
    }

    /// The wire name of the payload's type.
    pub fn message_type(&self) -> &'static str {
        self.body.message_type()
    }

    /// Serialises to JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    /// Parses and validates a message from the wire.
    ///
    /// Errors carry the code a receiver answers with: 5001 not JSON or not an object,
    /// 5002 wrong version, 5003 unknown type, 5004 missing or mistyped field, 5005 a value out
    /// of range. Unknown fields are tolerated.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, ProtocolError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ProtocolError::new(
                ErrorCode::MalformedMessage,
                format!("message is not valid JSON: {e}"),
            )
        })?;
        Envelope::from_value(value)
    }

    /// Validates an already-parsed JSON value; see [`Envelope::parse`].
    pub fn from_value(value: Value) -> Result<Envelope, ProtocolError> {
        let obj = value.as_object().ok_or_else(|| {
            ProtocolError::new(ErrorCode::MalformedMessage, "message is not a JSON object")
        })?;
        match obj.get("version") {
            None => return Err(ProtocolError::field("version", "missing field `version`")),
            // Any integer is a version, even a nonsensical one (0, -1, 2): that is "not a
            // version this build speaks" (5002); a string or a fraction is mistyped (5004).
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => {
                return Err(ProtocolError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "unsupported protocol version {n}, this build speaks {PROTOCOL_VERSION}"
                    ),
                )
                .with_details(
                    serde_json::json!({ "version": n, "supported": [PROTOCOL_VERSION] }),
                ))
            }
            Some(_) => {
                return Err(ProtocolError::field(
                    "version",
                    "`version` must be an integer",
                ))
            }
        }
        match obj.get("message_type") {
            None => {
                return Err(ProtocolError::field(
                    "message_type",
                    "missing field `message_type`",
                ))
            }
            Some(Value::String(t)) if MESSAGE_TYPES.contains(&t.as_str()) => {}
            Some(Value::String(t)) => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownMessageType,
                    format!("unknown message_type `{t}`"),
                )
                .with_details(serde_json::json!({ "message_type": t, "known": MESSAGE_TYPES })))
            }
            Some(_) => {
                return Err(ProtocolError::field(
                    "message_type",
                    "`message_type` must be a string",
                ))
            }
        }
        check_progress(obj)?;
        check_no_nul(&value, &mut String::new())?;
        let envelope = typed(value)?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Checks the value ranges serde cannot express.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::new(
                ErrorCode::UnsupportedVersion,
                format!("unsupported protocol version {}", self.version),
            ));
        }
        match &self.body {
            Message::WorkStatus(s) if s.progress > 100 => Err(ProtocolError::new(
                ErrorCode::ValueOutOfRange,
                format!("progress {} is outside 0..=100", s.progress),
            )
            .with_details(serde_json::json!({ "field": "payload.progress", "value": s.progress }))),
            Message::WorkResult(r) if r.attempt == 0 => Err(ProtocolError::new(
                ErrorCode::ValueOutOfRange,
                "attempt must be 1 or more",
            )
            .with_details(serde_json::json!({ "field": "payload.attempt", "value": 0 }))),
            Message::WorkRequest(w) if w.attempt == 0 => Err(ProtocolError::new(
                ErrorCode::ValueOutOfRange,
                "attempt must be 1 or more",
            )),
            Message::WorkRequest(w) if w.action.is_empty() || w.agent_type.is_empty() => Err(
                ProtocolError::field("payload.action", "action and agent_type must not be empty"),
            ),
            Message::WorkRequest(w)
                if w.resources_required.memory_gb.is_nan()
                    || w.resources_required.memory_gb < 0.0 =>
            {
                Err(ProtocolError::new(
                    ErrorCode::ValueOutOfRange,
                    "resources_required.memory_gb must be 0 or more",
                ))
            }
            Message::UserRequest(u) if u.text.trim().is_empty() => Err(ProtocolError::field(
                "payload.text",
                "text must not be empty",
            )),
            _ => Ok(()),
        }
    }
}

/// The envelope's fields besides its payload.
#[derive(Deserialize)]
struct Header {
    message_id: Uuid,
    trace_id: String,
    #[serde(default)]
    request_id: Option<Uuid>,
    timestamp: DateTime<Utc>,
    version: u32,
}

/// Deserialises a checked envelope, naming the field (a JSON path such as
/// `payload.memory.total_gb`) a failure is about in the message and in `details.field`.
fn typed(mut value: Value) -> Result<Envelope, ProtocolError> {
    let payload = value
        .as_object_mut()
        .and_then(|o| o.remove("payload"))
        .ok_or_else(|| ProtocolError::field("payload", "missing field `payload`"))?;
    let message_type = value
        .get("message_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let header: Header = at_path("", value)?;
    let body = match message_type.as_str() {
        "work_request" => Message::WorkRequest(at_path("payload", payload)?),
        "work_status" => Message::WorkStatus(at_path("payload", payload)?),
        "work_result" => Message::WorkResult(at_path("payload", payload)?),
        "error" => Message::Error(at_path("payload", payload)?),
        "user_request" => Message::UserRequest(at_path("payload", payload)?),
        "heartbeat" => Message::Heartbeat(at_path("payload", payload)?),
        "cancel" => Message::Cancel(at_path("payload", payload)?),
        other => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownMessageType,
                format!("unknown message_type `{other}`"),
            ))
        }
    };
    Ok(Envelope {
        message_id: header.message_id,
        trace_id: header.trace_id,
        request_id: header.request_id,
        timestamp: header.timestamp,
        version: header.version,
        body,
    })
}

/// Deserialises `value`, found at `prefix`, into `T`; a failure names the field's path.
fn at_path<T: serde::de::DeserializeOwned>(prefix: &str, value: Value) -> Result<T, ProtocolError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut field = prefix.to_string();
        let inner = e.inner().to_string();
        let mut push = |segment: &str| {
            if segment.is_empty() || segment == "." {
                return;
            }
            if !field.is_empty() && !segment.starts_with('[') {
                field.push('.');
            }
            field.push_str(segment);
        };
        push(&e.path().to_string());
        // serde reports a missing field at its parent: name the field itself.
        if let Some(name) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            push(name);
        }
        let field = if field.is_empty() {
            "message".to_string()
        } else {
            field
        };
        ProtocolError::new(
            ErrorCode::InvalidField,
            format!("invalid field `{field}`: {inner}"),
        )
        .with_details(serde_json::json!({ "field": field, "reason": inner }))
    })
}

/// Refuses a NUL character in any string or key: no store keeps one (PostgreSQL's text
/// cannot), so such a message could never be processed and would be retried forever.
fn check_no_nul(v: &Value, path: &mut String) -> Result<(), ProtocolError> {
    let nul = |path: &str| {
        let field = if path.is_empty() { "message" } else { path };
        Err(
            ProtocolError::field(field, &format!("`{field}` contains a NUL character"))
                .with_details(serde_json::json!({ "field": field, "reason": "nul_character" })),
        )
    };
    match v {
        Value::String(s) if s.contains('\0') => nul(path),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_no_nul(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                if k.contains('\0') {
                    return nul(path);
                }
                check_no_nul(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
