//! The JSON Schemas in `chiffon-protocol/schema/` and the error-code table in PROTOCOL.md
//! are generated from the Rust types; this test fails when they drift. Regenerate them with
//!
//! ```sh
//! CHIFFON_BLESS=1 cargo test -p chiffon-protocol --features schema --test schema
//! ```
//!
//! It also checks that the schemas say what `Envelope::parse` enforces (required fields,
//! ranges), and that every message example in PROTOCOL.md parses.
#![cfg(feature = "schema")]

use std::path::{Path, PathBuf};

use chiffon_protocol::schema::schemas;
use chiffon_protocol::{Envelope, ErrorCode, MESSAGE_TYPES};
use serde_json::Value;

const BLESS: &str = "CHIFFON_BLESS";
const TABLE_BEGIN: &str = "<!-- error-codes:begin (generated: CHIFFON_BLESS=1 cargo test -p chiffon-protocol --features schema --test schema) -->\n";
const TABLE_END: &str = "<!-- error-codes:end -->";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn blessing() -> bool {
    std::env::var_os(BLESS).is_some_and(|v| v == "1")
}

/// Compares `path` with `expected`, or writes it when blessing.
fn check_file(path: &Path, expected: &str, stale: &mut Vec<String>) {
    let actual = std::fs::read_to_string(path).unwrap_or_default();
    if actual == expected {
        return;
    }
    if blessing() {
        std::fs::write(path, expected).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    } else {
        stale.push(path.display().to_string());
    }
}

fn fail_if_stale(stale: &[String]) {
    assert!(
        stale.is_empty(),
        "out of date with the Rust types: {stale:?}\nregenerate with: {BLESS}=1 cargo test -p chiffon-protocol --features schema --test schema"
    );
}

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = crate_dir().join("schema");
    let mut stale = Vec::new();
    let all = schemas();
    for (name, schema) in &all {
        let text = serde_json::to_string_pretty(schema).unwrap() + "\n";
        check_file(&dir.join(format!("{name}.schema.json")), &text, &mut stale);
    }
    // No leftover file of a type that is gone.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let stem = file.trim_end_matches(".schema.json");
        if !all.iter().any(|(n, _)| *n == stem) {
            stale.push(format!(
                "{} (no such type; delete it)",
                dir.join(&file).display()
            ));
        }
    }
    fail_if_stale(&stale);
}

#[test]
fn protocol_md_error_table_matches_the_code_table() {
    let path = crate_dir().join("../PROTOCOL.md");
    let doc = std::fs::read_to_string(&path).expect("PROTOCOL.md at the repository root");
    let start = doc
        .find(TABLE_BEGIN)
        .expect("PROTOCOL.md has the error-code markers")
        + TABLE_BEGIN.len();
    let end = start + doc[start..].find(TABLE_END).expect("the end marker");
    let expected = format!(
        "{}{}{}",
        &doc[..start],
        ErrorCode::markdown_table(),
        &doc[end..]
    );
    let mut stale = Vec::new();
    check_file(&path, &expected, &mut stale);
    fail_if_stale(&stale);
}

#[test]
fn one_schema_per_message_type_and_the_envelope() {
    let names: Vec<&str> = schemas().iter().map(|(n, _)| *n).collect();
    assert_eq!(names[0], "envelope");
    assert_eq!(&names[1..], MESSAGE_TYPES);
}

fn schema(name: &str) -> Value {
    schemas().into_iter().find(|(n, _)| *n == name).unwrap().1
}

fn required(schema: &Value) -> Vec<&str> {
    schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn schemas_encode_the_parse_rules() {
    let status = schema("work_status");
    assert_eq!(status["properties"]["progress"]["maximum"], 100);
    assert_eq!(status["properties"]["progress"]["minimum"], 0);
    for f in ["task_id", "status", "progress"] {
        assert!(required(&status).contains(&f), "work_status.{f}");
    }
    let result = schema("work_result");
    assert_eq!(result["properties"]["attempt"]["minimum"], 1);
    assert!(
        required(&result).contains(&"attempt"),
        "attempt is required in work_result"
    );
    let request = schema("work_request");
    assert_eq!(request["properties"]["attempt"]["minimum"], 1);
    assert_eq!(request["properties"]["action"]["minLength"], 1);
    assert!(
        !required(&request).contains(&"attempt"),
        "work_request.attempt defaults to 1"
    );
    let user = schema("user_request");
    assert_eq!(user["properties"]["text"]["minLength"], 1);
    let hb = schema("heartbeat");
    for f in ["agent_id", "agent_type", "hostname"] {
        assert!(required(&hb).contains(&f), "heartbeat.{f}");
    }
    for f in ["cpu", "memory", "gpus", "running_tasks"] {
        assert!(!required(&hb).contains(&f), "heartbeat.{f} is optional");
    }
    let env = schema("envelope");
    for f in [
        "message_id",
        "trace_id",
        "timestamp",
        "version",
        "message_type",
        "payload",
    ] {
        let text = env.to_string();
        assert!(text.contains(&format!("\"{f}\"")), "envelope.{f}");
    }
    assert_eq!(env["properties"]["version"]["const"], 1);
    assert_eq!(env["properties"]["timestamp"]["format"], "date-time");
    assert_eq!(env["properties"]["message_id"]["format"], "uuid");
}

/// Every ```json block of PROTOCOL.md that is a whole message (has `message_type`) parses.
#[test]
fn protocol_md_examples_parse() {
    let doc = std::fs::read_to_string(crate_dir().join("../PROTOCOL.md")).unwrap();
    let mut seen = Vec::new();
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("```json\n") {
        let block = &rest[i + 8..];
        let end = block.find("```").unwrap();
        let text = &block[..end];
        rest = &block[end + 3..];
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => panic!("PROTOCOL.md has a json block that is not JSON ({e}):\n{text}"),
        };
        if value.get("message_type").is_none() {
            continue;
        }
        let env = Envelope::from_value(value)
            .unwrap_or_else(|e| panic!("PROTOCOL.md example rejected: {e}\n{text}"));
        seen.push(env.message_type());
    }
    for t in MESSAGE_TYPES {
        assert!(seen.contains(t), "PROTOCOL.md has no example of `{t}`");
    }
}
