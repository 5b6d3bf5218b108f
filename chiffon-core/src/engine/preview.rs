//! The automatic dry run before approval: while a plan awaits a person, each step whose
//! action declares `check_mode = true` runs in check mode over the bus like any task (its
//! own task id, so its result never touches the step), bounded in time. The person sees
//! what each step would change (`plan.steps[i].preview`). A failed preview is shown as
//! such and blocks nothing.

use crate::audit::AuditEvent;
use chrono::Utc;
use serde_json::json;

use chiffon_protocol::{
    Envelope, ErrorCode, ErrorPayload, Message, TaskState, WorkRequest, WorkResult,
};

use super::*;
use crate::model::{
    GroupWrite, NewAuditEntry, PreviewStatus, Request, RequestStatus, Step, StepPreview,
};

impl Engine {
    /// Publishes the check run of every check-mode step of a plan now awaiting approval.
    /// Best effort: a step whose preview cannot be published gets a failed preview.
    pub(super) async fn start_previews(&self, request: &Request) {
        if !self.inner.config.approval.preview || request.dry_run {
            return;
        }
        let steps = match self.inner.store.steps(request.id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(request = %request.id, error = %e, "previews not started");
                return;
            }
        };
        let agents = self.inner.store.agents().await.unwrap_or_default();
        let agents: Vec<_> = agents
            .into_iter()
            .filter(|a| {
                Utc::now() - a.last_seen
                    <= chrono::TimeDelta::from_std(self.inner.config.dispatch.heartbeat_max_age)
                        .unwrap_or(chrono::TimeDelta::MAX)
            })
            .collect();
        let timeout = self.inner.config.dispatch.preview_timeout;
        let topology = self.inner.transport.topology().clone();
        for step in steps {
            let Some(spec) = self.inner.catalog.actions.get(&step.action) else {
                continue;
            };
            if !spec.check_mode {
                continue;
            }
            let now = Utc::now();
            let mut preview = StepPreview {
                status: PreviewStatus::Pending,
                task_id: Uuid::new_v4(),
                changed: None,
                diff: None,
                error: None,
                broker_user: None,
                requested_at: now,
                deadline_at: now
                    + chrono::TimeDelta::from_std(timeout).unwrap_or(chrono::TimeDelta::MAX),
                finished_at: None,
            };
            // The same placement as a real dispatch, without booking the agent's memory: a
            // check run changes nothing and is short.
            let needs = step.resources.gpu
                || step.resources.memory_gb > 0.0
                || step.agent_type == "desktop";
            let queue = if needs {
                match crate::scheduler::choose_agent(&mut agents.clone(), &step) {
                    Some(a) if step.agent_type == "desktop" => {
                        Some(topology.desktop_queue(&a.hostname))
                    }
                    Some(a) => Some(
                        a.heartbeat
                            .queue
                            .clone()
                            .unwrap_or_else(|| topology.agent_queue(&step.agent_type)),
                    ),
                    None => None,
                }
            } else {
                Some(topology.agent_queue(&step.agent_type))
            };
            let Some(queue) = queue else {
                preview.status = PreviewStatus::Failed;
                preview.finished_at = Some(now);
                preview.error = Some(ErrorPayload::new(
                    ErrorCode::NoCapacity,
                    format!(
                        "no agent of type `{}` with the resources this step needs is connected: no dry run",
                        step.agent_type
                    ),
                ));
                let write = self.preview_write(request.id, &step, preview, true, "engine");
                if let Err(e) = self.group_write(write).await {
                    tracing::warn!(task = %step.task_id, error = %e, "preview not recorded");
                }
                continue;
            };
            // Approved (or cancelled) meanwhile: the real run is what counts now.
            match self.inner.store.get_request(request.id).await {
                Ok(r) if r.status == RequestStatus::AwaitingApproval => {}
                _ => break,
            }
            // Recorded with its `preview_started` entry before it is published, so its
            // result always finds it.
            let write = GroupWrite::Preview {
                task_id: step.task_id,
                preview: Box::new(preview.clone()),
                start: true,
                audit: vec![NewAuditEntry {
                    request_id: Some(request.id),
                    actor: "engine".into(),
                    event: AuditEvent::PreviewStarted,
                    details: json!({ "steps": [{ "seq": step.seq, "action": step.action, "preview_task_id": preview.task_id, "queue": queue }] }),
                }],
            };
            if let Err(e) = self.group_write(write).await {
                tracing::warn!(task = %step.task_id, error = %e, "preview not recorded");
                continue;
            }
            let work = WorkRequest {
                agent_type: step.agent_type.clone(),
                task_id: preview.task_id,
                action: step.action.clone(),
                parameters: step.parameters.clone(),
                resources_required: step.resources.clone(),
                dry_run: true,
                attempt: 1,
                timeout_seconds: Some(timeout.as_secs().max(1)),
            };
            let env = Envelope::new(
                request.trace_id.clone(),
                Some(request.id),
                Message::WorkRequest(work),
            );
            if let Err(e) = self.publish_to(&queue, &env).await {
                preview.status = PreviewStatus::Failed;
                preview.finished_at = Some(Utc::now());
                preview.error = Some(ErrorPayload::new(e.code(), format!("not published: {e}")));
                let write = self.preview_write(request.id, &step, preview, false, "engine");
                if let Err(e) = self.group_write(write).await {
                    tracing::warn!(task = %step.task_id, error = %e, "failed preview not recorded; it shows as failed at its deadline");
                }
            }
        }
    }

    /// A preview's outcome with its `preview_finished` entry, as one write (`start`: a
    /// preview that never ran, recorded as it is).
    fn preview_write(
        &self,
        request_id: Uuid,
        step: &Step,
        preview: StepPreview,
        start: bool,
        actor: &str,
    ) -> GroupWrite {
        let mut details = json!({
            "seq": step.seq,
            "action": step.action,
            "status": preview.status,
            "changed": preview.changed,
        });
        if let Some(e) = &preview.error {
            details["code"] = json!(e.code.code());
        }
        GroupWrite::Preview {
            task_id: step.task_id,
            preview: Box::new(preview),
            start,
            audit: vec![NewAuditEntry {
                request_id: Some(request_id),
                actor: actor.to_string(),
                event: AuditEvent::PreviewFinished,
                details,
            }],
        }
    }

    /// A result for a preview task: stored once as the step's preview; never applied to the
    /// step itself.
    pub(super) async fn on_preview_result(
        &self,
        step: Step,
        r: &WorkResult,
        publisher: &str,
    ) -> Result<(), EngineError> {
        let Some(mut preview) = step.preview.clone() else {
            return Ok(());
        };
        if preview.task_id != r.task_id
            || preview.status != PreviewStatus::Pending
            || !r.status.is_terminal()
            || r.attempt != 1
        {
            return Ok(());
        }
        let redactor = &self.inner.config.redactor;
        preview.finished_at = Some(Utc::now());
        preview.broker_user = Some(publisher.to_string());
        preview.changed = r.changed;
        preview.diff = r.diff.as_deref().map(|d| redactor.redact(d).into_owned());
        match r.status {
            TaskState::Completed => preview.status = PreviewStatus::Completed,
            _ => {
                preview.status = PreviewStatus::Failed;
                let mut e = r.error.clone().unwrap_or_else(|| {
                    ErrorPayload::new(ErrorCode::ActionFailed, "the dry run failed")
                });
                redactor.redact_error(&mut e);
                preview.error = Some(e);
            }
        }
        // Stored once, with its entry; another copy (or the deadline) got there first if
        // it is no longer pending.
        let write = self.preview_write(
            step.request_id,
            &step,
            preview,
            false,
            &format!("bus:{publisher}"),
        );
        match self.group_write(write).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A preview still pending past its deadline shows as failed (nothing needs to write it).
pub(super) fn settle_overdue(step: &mut Step, now: chrono::DateTime<Utc>) {
    if let Some(p) = step.preview.as_mut() {
        if p.status == PreviewStatus::Pending && now > p.deadline_at {
            p.status = PreviewStatus::Failed;
            p.error = Some(ErrorPayload::new(
                ErrorCode::AgentTimeout,
                format!(
                    "no agent answered the dry run within {} s",
                    (p.deadline_at - p.requested_at).num_seconds()
                ),
            ));
        }
    }
}
