//! Error codes 5001-5999: one table, shared by the bus, the HTTP API, the CLI and the agents.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $variant:ident = $code:literal, $name:literal, $transient:literal, $http:literal, $meaning:literal; )*) => {
        /// Every error Chiffon reports carries one of these codes.
        ///
        /// | code | name | transient | HTTP | meaning |
        /// | --- | --- | --- | --- | --- |
        $( #[doc = concat!("| ", $code, " | `", $name, "` | ", $transient, " | ", $http, " | ", $meaning, " |")] )*
        ///
        /// *Transient* errors may succeed when retried (with backoff); permanent ones will not.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( #[doc = $meaning] $variant = $code, )*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The numeric code (5001-5999).
            pub fn code(self) -> u16 { self as u16 }

            /// The code's stable snake_case name.
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// What the code means, in one sentence.
            pub fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }

            /// Whether retrying the same operation later may succeed.
            pub fn is_transient(self) -> bool {
                match self { $(ErrorCode::$variant => $transient,)* }
            }

            /// The HTTP status an API answers with for this code.
            pub fn http_status(self) -> u16 {
                match self { $(ErrorCode::$variant => $http,)* }
            }

            /// Looks a numeric code up in the table.
            pub fn from_code(code: u16) -> Option<ErrorCode> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    // 50xx: messages and the bus
    MalformedMessage = 5001, "malformed_message", false, 400, "The message is not valid JSON or not a JSON object.";
    UnsupportedVersion = 5002, "unsupported_version", false, 400, "The envelope's `version` is not one this build speaks (1).";
    UnknownMessageType = 5003, "unknown_message_type", false, 400, "The envelope's `message_type` is not one of the known types.";
    InvalidField = 5004, "invalid_field", false, 400, "A field is missing, has the wrong type or an invalid value.";
    ValueOutOfRange = 5005, "value_out_of_range", false, 400, "A numeric field is outside its allowed range (for example progress outside 0..=100).";
    BusUnavailable = 5006, "bus_unavailable", true, 503, "The message bus cannot be reached; retried with backoff.";
    PublishNotConfirmed = 5007, "publish_not_confirmed", true, 503, "The broker did not confirm (nacked or dropped) a published message.";
    DeadLettered = 5008, "dead_lettered", false, 400, "The message could not be processed and was moved to the dead-letter queue.";
    PublisherNotAllowed = 5009, "publisher_not_allowed", false, 403, "The broker-authenticated publisher (`user_id`) may not send this message: none was given, it is not an agent user, or the step's attempt belongs to another agent.";
    DeliveryLimit = 5010, "delivery_limit", false, 400, "The message failed too many times in a row and was moved to the dead-letter queue.";
    // 51xx: the store
    StoreUnavailable = 5101, "store_unavailable", true, 503, "The database cannot be reached or timed out.";
    NotFound = 5102, "not_found", false, 404, "The request, step or record does not exist.";
    Conflict = 5103, "conflict", false, 409, "The record changed concurrently or already exists.";
    AuditChainBroken = 5104, "audit_chain_broken", false, 500, "The audit log's hash chain does not verify: a row was altered or deleted.";
    MigrationFailed = 5105, "migration_failed", false, 500, "Database migrations could not be applied.";
    // 52xx: planning and LLM providers
    LlmUnavailable = 5201, "llm_unavailable", true, 502, "An LLM provider could not be reached or answered 5xx.";
    LlmRateLimited = 5202, "llm_rate_limited", true, 429, "An LLM provider answered 429 (rate limited).";
    LlmBudgetExhausted = 5203, "llm_budget_exhausted", false, 402, "The provider's monthly budget would be exceeded by this call.";
    LlmInvalidResponse = 5204, "llm_invalid_response", false, 502, "The LLM answered something that is not a valid plan.";
    PlanUnknownAction = 5205, "plan_unknown_action", false, 422, "A plan names an action that is not in the catalog.";
    PlanInvalidParameter = 5206, "plan_invalid_parameter", false, 422, "A plan's parameter fails the action's schema.";
    NoPlan = 5207, "no_plan", false, 422, "No provider, including the offline planner, could plan the request.";
    CostLimitExceeded = 5208, "cost_limit_exceeded", false, 422, "The plan's estimated cost is above the per-request limit.";
    LlmTimeout = 5209, "llm_timeout", true, 504, "An LLM provider did not answer in time.";
    LlmAuth = 5210, "llm_auth", false, 502, "An LLM provider rejected the API key (401/403).";
    CircuitOpen = 5211, "circuit_open", true, 503, "The provider failed repeatedly and is paused for a cool-down.";
    LlmRefused = 5212, "llm_refused", false, 422, "The LLM declined to plan the request and gave its reason; no other planner is asked to guess instead.";
    // 53xx: the request lifecycle and approval
    IllegalTransition = 5301, "illegal_transition", false, 409, "The request's current status does not allow this change.";
    FourEyesViolation = 5302, "four_eyes_violation", false, 403, "The four-eyes rule forbids approving one's own request.";
    ApprovalExpired = 5303, "approval_expired", false, 409, "The request waited for approval past the configured time.";
    RequestCancelled = 5304, "request_cancelled", false, 409, "The request was cancelled.";
    // 54xx: agents and execution
    NoCapacity = 5401, "no_capacity", true, 503, "No agent with the needed CPU, memory or GPU is available yet.";
    AgentTimeout = 5402, "agent_timeout", true, 504, "The agent went silent past the step's timeout.";
    ActionFailed = 5403, "action_failed", false, 500, "The action ran and failed (for example a failed Ansible task).";
    ActionNotSupported = 5404, "action_not_supported", false, 422, "The agent does not handle this action.";
    AnsibleMissing = 5405, "ansible_missing", false, 500, "`ansible-playbook` was not found; install ansible-core.";
    TaskCancelled = 5406, "task_cancelled", false, 409, "The task was cancelled while running.";
    InvalidParameters = 5407, "invalid_parameters", false, 422, "The work request's parameters fail the action's schema.";
    ExecutorCrashed = 5408, "executor_crashed", true, 500, "The agent or its child process died unexpectedly.";
    TaskDeadline = 5409, "task_deadline", false, 504, "The task ran past its deadline and was stopped.";
    // 55xx: HTTP API
    BadRequest = 5501, "bad_request", false, 400, "The HTTP request is malformed (bad JSON, wrong types).";
    PayloadTooLarge = 5502, "payload_too_large", false, 413, "The HTTP request body is larger than allowed.";
    Unauthorized = 5503, "unauthorized", false, 401, "No valid API token was presented.";
    Forbidden = 5504, "forbidden", false, 403, "The token's role does not allow this operation.";
    RouteNotFound = 5505, "route_not_found", false, 404, "No such route.";
    Internal = 5506, "internal", true, 500, "An unexpected internal error; see the server log with the trace id.";
    HostNotAllowed = 5507, "host_not_allowed", false, 421, "The request's `Host` is not one the server answers (loopback names, the bind address, `server.allowed_hosts`).";
    CrossSiteRequest = 5508, "cross_site_request", false, 403, "A state-changing request came from another site (`Origin` or `Sec-Fetch-Site`).";
    MethodNotAllowed = 5509, "method_not_allowed", false, 405, "The route exists but not with this HTTP method.";
    UnsupportedMediaType = 5510, "unsupported_media_type", false, 415, "The request body is not `application/json`.";
    // 56xx: configuration and catalog
    InvalidConfig = 5601, "invalid_config", false, 400, "The configuration file or an environment variable is invalid.";
    InvalidCatalog = 5602, "invalid_catalog", false, 500, "An action's `action.toml` or playbook is missing or invalid.";
    // 57xx: audit trail
    GitCommitFailed = 5701, "git_commit_failed", true, 500, "The audit commit could not be written to the git repository.";
    AuditMissingCommit = 5702, "audit_missing_commit", false, 500, "A terminal approved request has no audit commit.";
    AuditRecordInvalid = 5703, "audit_record_invalid", false, 500, "An audit record cannot be written as a git commit (for example an empty approver name).";
}

impl ErrorCode {
    /// The table as Markdown (`| code | name | HTTP | transient | meaning |`), as PROTOCOL.md
    /// shows it.
    pub fn markdown_table() -> String {
        let mut out = String::from(
            "| code | name | HTTP | transient | meaning |\n| --- | --- | --- | --- | --- |\n",
        );
        for c in ErrorCode::ALL {
            out.push_str(&format!(
                "| {} | `{}` | {} | {} | {} |\n",
                c.code(),
                c.name(),
                c.http_status(),
                if c.is_transient() { "yes" } else { "no" },
                c.meaning()
            ));
        }
        out
    }
}

/// On the wire a code is its number; the schema lists every code with its name and meaning.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for ErrorCode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ErrorCode".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let codes: Vec<serde_json::Value> = ErrorCode::ALL
            .iter()
            .map(|c| {
                serde_json::json!({
                    "const": c.code(),
                    "title": c.name(),
                    "description": c.meaning(),
                })
            })
            .collect();
        schemars::json_schema!({
            "description": "An error code from the 5001-5999 table (PROTOCOL.md, \"Error codes\").",
            "type": "integer",
            "oneOf": codes,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = u16::deserialize(d)?;
        ErrorCode::from_code(code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {code}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_in_range_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!((5001..=5999).contains(&c.code()), "{c} out of range");
            assert!(seen.insert(c.code()), "{c} duplicated");
            assert_eq!(ErrorCode::from_code(c.code()), Some(*c));
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, c.code().to_string());
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), *c);
            assert!(!c.meaning().is_empty());
        }
        assert!(serde_json::from_str::<ErrorCode>("5999").is_err());
    }

    #[test]
    fn transient_classification() {
        assert!(ErrorCode::LlmRateLimited.is_transient());
        assert!(ErrorCode::BusUnavailable.is_transient());
        assert!(!ErrorCode::PlanUnknownAction.is_transient());
        assert!(!ErrorCode::ActionFailed.is_transient());
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
    }
}
