//! The audit log's event names: one enum, so every decision the engine records has a name
//! from one list (the stored `event` column holds [`AuditEvent::as_str`]).

use serde::{Deserialize, Serialize};

use crate::model::RequestStatus;

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    /// A request was submitted (its text, requester, dry-run flag).
    Received,
    /// A plan was made (provider, model, cost, steps).
    Planned,
    /// Planning failed (code and reason).
    PlanFailed,
    /// A cached plan was used.
    CacheHit,
    /// A provider failed and the next one in the chain was asked.
    Fallback,
    /// A model declined the request.
    LlmRefused,
    /// The request was refused: by a person, or before approval by a rule.
    Rejected,
    /// A rule approved the plan without a person.
    AutoApproved,
    /// An approval was refused (not the approver's to give, or the plan changed).
    ApprovalRefused,
    /// A person approved the plan.
    Approved,
    /// Someone asked to cancel.
    CancelRequested,
    /// A step was published to an agent.
    Dispatched,
    /// An agent reported a step's result.
    StepResult,
    /// A step failed and will be tried again.
    Retry,
    /// A result for an attempt already finished was received and not applied.
    DuplicateResult,
    /// An agent reported an error outside any step.
    AgentError,
    /// A bus message was refused (unknown sender, bad schema, wrong publisher).
    MessageRefused,
    /// A step ran past its deadline.
    Timeout,
    /// A step ran past its deadline and will be tried again.
    TimeoutRetry,
    /// A cancelled step's agent never confirmed within the deadline.
    CancelTimeout,
    /// A plan's automatic dry run was published.
    PreviewStarted,
    /// A plan's automatic dry run finished.
    PreviewFinished,
    /// The request completed.
    Completed,
    /// The request failed.
    Failed,
    /// The request was cancelled.
    Cancelled,
    /// The request's git audit record was committed (commit id, record digest).
    Committed,
    /// The request's git audit record could not be committed.
    CommitFailed,
}

impl AuditEvent {
    /// Every event, in the order above.
    pub const ALL: [AuditEvent; 27] = [
        AuditEvent::Received,
        AuditEvent::Planned,
        AuditEvent::PlanFailed,
        AuditEvent::CacheHit,
        AuditEvent::Fallback,
        AuditEvent::LlmRefused,
        AuditEvent::Rejected,
        AuditEvent::AutoApproved,
        AuditEvent::ApprovalRefused,
        AuditEvent::Approved,
        AuditEvent::CancelRequested,
        AuditEvent::Dispatched,
        AuditEvent::StepResult,
        AuditEvent::Retry,
        AuditEvent::DuplicateResult,
        AuditEvent::AgentError,
        AuditEvent::MessageRefused,
        AuditEvent::Timeout,
        AuditEvent::TimeoutRetry,
        AuditEvent::CancelTimeout,
        AuditEvent::PreviewStarted,
        AuditEvent::PreviewFinished,
        AuditEvent::Completed,
        AuditEvent::Failed,
        AuditEvent::Cancelled,
        AuditEvent::Committed,
        AuditEvent::CommitFailed,
    ];

    /// The name stored in `audit_log.event`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditEvent::Received => "received",
            AuditEvent::Planned => "planned",
            AuditEvent::PlanFailed => "plan_failed",
            AuditEvent::CacheHit => "cache_hit",
            AuditEvent::Fallback => "fallback",
            AuditEvent::LlmRefused => "llm_refused",
            AuditEvent::Rejected => "rejected",
            AuditEvent::AutoApproved => "auto_approved",
            AuditEvent::ApprovalRefused => "approval_refused",
            AuditEvent::Approved => "approved",
            AuditEvent::CancelRequested => "cancel_requested",
            AuditEvent::Dispatched => "dispatched",
            AuditEvent::StepResult => "step_result",
            AuditEvent::Retry => "retry",
            AuditEvent::DuplicateResult => "duplicate_result",
            AuditEvent::AgentError => "agent_error",
            AuditEvent::MessageRefused => "message_refused",
            AuditEvent::Timeout => "timeout",
            AuditEvent::TimeoutRetry => "timeout_retry",
            AuditEvent::CancelTimeout => "cancel_timeout",
            AuditEvent::PreviewStarted => "preview_started",
            AuditEvent::PreviewFinished => "preview_finished",
            AuditEvent::Completed => "completed",
            AuditEvent::Failed => "failed",
            AuditEvent::Cancelled => "cancelled",
            AuditEvent::Committed => "committed",
            AuditEvent::CommitFailed => "commit_failed",
        }
    }

    /// The event of a stored name, if it is one of ours.
    pub fn parse(name: &str) -> Option<AuditEvent> {
        AuditEvent::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The event recording that a request ended in `status`; `None` for a status that is not
    /// an end reached after approval (`rejected` is audited as [`AuditEvent::Rejected`] by
    /// whoever rejected).
    pub const fn ended(status: RequestStatus) -> Option<AuditEvent> {
        match status {
            RequestStatus::Completed => Some(AuditEvent::Completed),
            RequestStatus::Failed => Some(AuditEvent::Failed),
            RequestStatus::Cancelled => Some(AuditEvent::Cancelled),
            RequestStatus::Rejected => Some(AuditEvent::Rejected),
            _ => None,
        }
    }
}

impl std::fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<AuditEvent> for String {
    fn eq(&self, other: &AuditEvent) -> bool {
        self == other.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        let mut seen = std::collections::HashSet::new();
        for e in AuditEvent::ALL {
            assert!(seen.insert(e.as_str()), "{e} named twice");
            assert_eq!(AuditEvent::parse(e.as_str()), Some(e));
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                serde_json::json!(e.as_str())
            );
        }
        assert_eq!(AuditEvent::parse("no_such_event"), None);
    }
}
