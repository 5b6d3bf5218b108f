//! Why a request waits: what a person sees instead of a request that stays `queued` with
//! no word. Read-only: computed from the steps, the agents' last heartbeats and the clock.

use chrono::{DateTime, Utc};

use crate::model::{AgentRecord, Request, RequestStatus, Step, StepStatus};

/// How recently an agent was heard from, against `dispatch.heartbeat_max_age` (60 s by
/// default; agents beat every 15 s by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within half the maximum age (by default: at most one beat missed).
    Fresh,
    /// Beats are being missed, but work is still sent to it.
    Stale,
    /// Silent for longer than the maximum age: no work is sent to it until it beats again.
    Offline,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Fresh => "fresh",
            Liveness::Stale => "stale",
            Liveness::Offline => "offline",
        }
    }
}

/// Where a heartbeat `age` old stands against `heartbeat_max_age`: the rule the dispatcher
/// and [`waiting_reason`] use for offline (older than the maximum age), halved for stale.
pub fn liveness(age: chrono::TimeDelta, heartbeat_max_age: chrono::TimeDelta) -> Liveness {
    if age > heartbeat_max_age {
        Liveness::Offline
    } else if age > heartbeat_max_age / 2 {
        Liveness::Stale
    } else {
        Liveness::Fresh
    }
}

/// Why `request` is not moving, or `None` when it is not waiting on anything the engine
/// can name (planning, awaiting a person, running a step an agent has taken, ended).
pub fn waiting_reason(
    request: &Request,
    steps: &[Step],
    agents: &[AgentRecord],
    heartbeat_max_age: chrono::TimeDelta,
    now: DateTime<Utc>,
) -> Option<String> {
    if !matches!(
        request.status,
        RequestStatus::Queued | RequestStatus::Running
    ) {
        return None;
    }
    // The first step that has not started: the one the request waits for.
    let step = steps
        .iter()
        .find(|s| matches!(s.status, StepStatus::Ready | StepStatus::Dispatched))?;
    let n = step.seq + 1;
    if step.status == StepStatus::Ready {
        if let Some(at) = step.not_before.filter(|t| *t > now) {
            return Some(format!(
                "step {n} ({}) is retried after a transient failure, not before {}",
                step.action,
                at.format("%H:%M:%S UTC")
            ));
        }
    }
    let of_type: Vec<&AgentRecord> = agents
        .iter()
        .filter(|a| a.agent_type == step.agent_type)
        .collect();
    let fresh: Vec<&AgentRecord> = of_type
        .iter()
        .copied()
        .filter(|a| now - a.last_seen <= heartbeat_max_age)
        .collect();
    let t = &step.agent_type;
    if of_type.is_empty() {
        return Some(match step.status {
            StepStatus::Dispatched => format!(
                "step {n} ({}) waits in queue `{}`: no agent of type `{t}` has ever sent a heartbeat",
                step.action,
                step.queue.as_deref().unwrap_or("?")
            ),
            _ => format!(
                "step {n} ({}) needs an agent of type `{t}`, and none is connected (no heartbeat ever received)",
                step.action
            ),
        });
    }
    if fresh.is_empty() {
        let last = of_type.iter().map(|a| a.last_seen).max().unwrap_or(now);
        return Some(format!(
            "step {n} ({}) needs an agent of type `{t}`: none has sent a heartbeat in the last {} s (the last one {} s ago)",
            step.action,
            heartbeat_max_age.num_seconds(),
            (now - last).num_seconds().max(0)
        ));
    }
    if step.status == StepStatus::Dispatched {
        // Published, and agents are alive: normally a matter of moments.
        let since = step
            .dispatched_at
            .map(|d| (now - d).num_seconds().max(0))
            .unwrap_or(0);
        return (since >= 10).then(|| {
            format!(
                "step {n} ({}) was published to `{}` {since} s ago and no agent has taken it yet",
                step.action,
                step.queue.as_deref().unwrap_or("?")
            )
        });
    }
    // Ready, agents alive: which resource is missing, agent by agent.
    let need_mem = step.resources.memory_gb.max(0.0);
    let mut why = Vec::new();
    for a in &fresh {
        let hb = &a.heartbeat;
        let mut lacks = Vec::new();
        if hb.max_tasks.is_some_and(|m| hb.running_tasks >= m) {
            lacks.push(format!("runs its maximum of {} tasks", hb.running_tasks));
        }
        match &hb.memory {
            // Unknown memory counts as none free (PROTOCOL.md, heartbeat).
            None if need_mem > 0.0 => lacks.push(format!(
                "does not report its memory (no `memory` in its heartbeat), the step needs {need_mem:.1} GiB"
            )),
            Some(m) if m.free_gb() < need_mem => lacks.push(format!(
                "has {:.1} GiB of memory free, the step needs {need_mem:.1}",
                m.free_gb()
            )),
            _ => {}
        }
        if step.resources.gpu
            && !hb
                .gpus
                .iter()
                .any(|g| g.memory_total_gb - g.memory_used_gb >= need_mem.min(g.memory_total_gb))
        {
            lacks.push(if hb.gpus.is_empty() {
                "has no GPU".to_string()
            } else {
                "has no GPU with enough free memory".to_string()
            });
        }
        if !lacks.is_empty() {
            why.push(format!("{} {}", a.agent_id, lacks.join(" and ")));
        }
    }
    if why.is_empty() {
        return None;
    }
    Some(format!(
        "step {n} ({}) waits for an agent of type `{t}` with room: {}",
        step.action,
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chiffon_protocol::{CpuMetrics, GpuMetrics, Heartbeat, MemoryMetrics, Resources};
    use uuid::Uuid;

    #[test]
    fn liveness_halves_the_maximum_age_for_stale() {
        let max = chrono::TimeDelta::seconds(60);
        let at = |s| liveness(chrono::TimeDelta::seconds(s), max);
        assert_eq!(at(0), Liveness::Fresh);
        assert_eq!(at(30), Liveness::Fresh);
        assert_eq!(at(31), Liveness::Stale);
        assert_eq!(at(60), Liveness::Stale);
        assert_eq!(at(61), Liveness::Offline);
    }

    fn request(status: RequestStatus) -> Request {
        Request {
            id: Uuid::new_v4(),
            trace_id: "t".into(),
            text: "x".into(),
            requester: "a".into(),
            submitted_by: "a".into(),
            dry_run: false,
            status,
            plan: None,
            approver: None,
            approval_comment: None,
            error: None,
            commit_id: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn step(status: StepStatus, memory_gb: f64, gpu: bool) -> Step {
        Step {
            request_id: Uuid::new_v4(),
            seq: 0,
            task_id: Uuid::new_v4(),
            action: "deploy".into(),
            parameters: Default::default(),
            agent_type: "desktop".into(),
            resources: Resources { gpu, memory_gb },
            status,
            attempt: 0,
            agent_id: None,
            queue: Some("agent.desktop.box".into()),
            broker_user: None,
            progress: 0,
            output: None,
            diff: None,
            changed: None,
            error: None,
            ready_at: None,
            dispatched_at: None,
            deadline_at: None,
            finished_at: None,
            not_before: None,
            preview: None,
        }
    }

    fn agent(free_gb: f64, age_s: i64, gpus: usize) -> AgentRecord {
        AgentRecord {
            agent_id: "box-1".into(),
            broker_user: None,
            agent_type: "desktop".into(),
            hostname: "box".into(),
            last_seen: Utc::now() - chrono::TimeDelta::seconds(age_s),
            heartbeat: Heartbeat {
                agent_id: "box-1".into(),
                agent_type: "desktop".into(),
                hostname: "box".into(),
                cpu: Some(CpuMetrics::default()),
                memory: Some(MemoryMetrics {
                    used_gb: 16.0 - free_gb,
                    total_gb: 16.0,
                }),
                gpus: (0..gpus)
                    .map(|i| GpuMetrics {
                        index: i as u32,
                        name: "g".into(),
                        utilization_percent: 0.0,
                        memory_used_gb: 7.5,
                        memory_total_gb: 8.0,
                    })
                    .collect(),
                running_tasks: 0,
                max_tasks: None,
                queue: None,
                actions: vec![],
            },
        }
    }

    fn reason(r: RequestStatus, s: &[Step], a: &[AgentRecord]) -> Option<String> {
        waiting_reason(
            &request(r),
            s,
            a,
            chrono::TimeDelta::seconds(60),
            Utc::now(),
        )
    }

    #[test]
    fn each_reason_is_named() {
        let ready = [step(StepStatus::Ready, 4.0, false)];
        let r = reason(RequestStatus::Queued, &ready, &[]).unwrap();
        assert!(r.contains("none is connected"), "{r}");
        let r = reason(RequestStatus::Queued, &ready, &[agent(8.0, 600, 0)]).unwrap();
        assert!(
            r.contains("none has sent a heartbeat in the last 60 s"),
            "{r}"
        );
        let r = reason(RequestStatus::Queued, &ready, &[agent(1.0, 1, 0)]).unwrap();
        assert!(
            r.contains("box-1 has 1.0 GiB of memory free, the step needs 4.0"),
            "{r}"
        );
        // An agent that does not report its memory has none free for a step that needs some.
        let mut unknown = agent(8.0, 1, 0);
        unknown.heartbeat.memory = None;
        let r = reason(RequestStatus::Queued, &ready, &[unknown]).unwrap();
        assert!(r.contains("box-1 does not report its memory"), "{r}");
        let gpu = [step(StepStatus::Ready, 1.0, true)];
        let r = reason(RequestStatus::Queued, &gpu, &[agent(8.0, 1, 0)]).unwrap();
        assert!(r.contains("has no GPU"), "{r}");
        // Room: nothing to say; not waiting: nothing to say.
        assert_eq!(
            reason(RequestStatus::Queued, &ready, &[agent(8.0, 1, 1)]),
            None
        );
        assert_eq!(reason(RequestStatus::AwaitingApproval, &ready, &[]), None);
        let mut retry = step(StepStatus::Ready, 0.0, false);
        retry.not_before = Some(Utc::now() + chrono::TimeDelta::seconds(30));
        let r = reason(RequestStatus::Running, &[retry], &[]).unwrap();
        assert!(r.contains("retried after a transient failure"), "{r}");
        let mut sent = step(StepStatus::Dispatched, 0.0, false);
        sent.dispatched_at = Some(Utc::now() - chrono::TimeDelta::seconds(30));
        let r = reason(RequestStatus::Running, &[sent.clone()], &[]).unwrap();
        assert!(r.contains("waits in queue `agent.desktop.box`"), "{r}");
        let r = reason(RequestStatus::Running, &[sent], &[agent(8.0, 1, 0)]).unwrap();
        assert!(r.contains("no agent has taken it yet"), "{r}");
    }
}
