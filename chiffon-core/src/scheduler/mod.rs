//! Resource-aware placement: which agent, by its last heartbeat, has room for a step.

use crate::model::{AgentRecord, Step};

/// Picks the agent with the most free memory among those of the step's type whose last
/// heartbeat shows the memory and (if needed) a GPU with free memory the step asks for,
/// and that runs fewer tasks than it can. The chosen agent's free figures are reduced in
/// `agents` so several steps of one round do not overbook it before its next heartbeat.
/// An agent whose heartbeat does not give its memory has none free: it gets only steps
/// that need no memory and no GPU.
pub fn choose_agent(agents: &mut [AgentRecord], step: &Step) -> Option<AgentRecord> {
    let need_mem = step.resources.memory_gb.max(0.0);
    let best = agents
        .iter_mut()
        .filter(|a| a.agent_type == step.agent_type)
        .filter(|a| {
            a.heartbeat
                .max_tasks
                .is_none_or(|m| a.heartbeat.running_tasks < m)
        })
        .filter(|a| free_gb(a) >= need_mem)
        .filter(|a| {
            !step.resources.gpu
                || a.heartbeat.gpus.iter().any(|g| {
                    g.memory_total_gb - g.memory_used_gb >= need_mem.min(g.memory_total_gb)
                })
        })
        .max_by(|a, b| free_gb(a).total_cmp(&free_gb(b)))?;
    if let Some(m) = best.heartbeat.memory.as_mut() {
        m.used_gb += need_mem;
    }
    best.heartbeat.running_tasks += 1;
    if step.resources.gpu {
        if let Some(g) = best.heartbeat.gpus.iter_mut().max_by(|a, b| {
            (a.memory_total_gb - a.memory_used_gb)
                .total_cmp(&(b.memory_total_gb - b.memory_used_gb))
        }) {
            g.memory_used_gb += need_mem;
        }
    }
    Some(best.clone())
}

/// Free memory by the last heartbeat; 0 when the agent did not say.
fn free_gb(a: &AgentRecord) -> f64 {
    a.heartbeat.memory.as_ref().map_or(0.0, |m| m.free_gb())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chiffon_protocol::{GpuMetrics, Heartbeat, MemoryMetrics};
    use serde_json::json;

    fn step(memory_gb: f64, gpu: bool) -> Step {
        serde_json::from_value(json!({
            "request_id": uuid::Uuid::new_v4(), "seq": 0, "task_id": uuid::Uuid::new_v4(),
            "action": "a", "parameters": {}, "agent_type": "python",
            "resources": { "memory_gb": memory_gb, "gpu": gpu },
            "status": "ready", "attempt": 0, "progress": 0
        }))
        .unwrap()
    }

    fn agent(id: &str, memory: Option<MemoryMetrics>, gpus: Vec<GpuMetrics>) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            broker_user: None,
            agent_type: "python".into(),
            hostname: id.into(),
            last_seen: chrono::Utc::now(),
            heartbeat: Heartbeat {
                agent_id: id.into(),
                agent_type: "python".into(),
                hostname: id.into(),
                cpu: None,
                memory,
                gpus,
                running_tasks: 0,
                max_tasks: None,
                queue: None,
                actions: vec![],
            },
        }
    }

    #[test]
    fn an_agent_with_unknown_resources_gets_only_steps_that_need_none() {
        let gpu = GpuMetrics {
            index: 0,
            name: "g".into(),
            utilization_percent: 0.0,
            memory_used_gb: 0.0,
            memory_total_gb: 24.0,
        };
        // Unknown memory, even with a GPU listed: nothing that needs memory.
        let mut agents = vec![agent("unknown", None, vec![gpu])];
        assert!(choose_agent(&mut agents, &step(0.0, false)).is_some());
        assert!(choose_agent(&mut agents, &step(1.0, false)).is_none());
        assert!(choose_agent(&mut agents, &step(0.5, true)).is_none());
        // A known agent next to it takes what needs memory.
        let known = MemoryMetrics {
            used_gb: 2.0,
            total_gb: 16.0,
        };
        agents.push(agent("known", Some(known), vec![]));
        let chosen = choose_agent(&mut agents, &step(4.0, false)).unwrap();
        assert_eq!(chosen.agent_id, "known");
        assert_eq!(chosen.heartbeat.memory.unwrap().used_gb, 6.0);
    }
}
