//! Resource-aware placement: which agent, by its last heartbeat, has room for a step.

use crate::model::{AgentRecord, Step};

/// Picks the agent with the most free memory among those of the step's type whose last
/// heartbeat shows the memory and (if needed) a GPU with free memory the step asks for,
/// and that runs fewer tasks than it can. The chosen agent's free figures are reduced in
/// `agents` so several steps of one round do not overbook it before its next heartbeat.
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
        .filter(|a| a.heartbeat.memory.free_gb() >= need_mem)
        .filter(|a| {
            !step.resources.gpu
                || a.heartbeat.gpus.iter().any(|g| {
                    g.memory_total_gb - g.memory_used_gb >= need_mem.min(g.memory_total_gb)
                })
        })
        .max_by(|a, b| {
            a.heartbeat
                .memory
                .free_gb()
                .total_cmp(&b.heartbeat.memory.free_gb())
        })?;
    best.heartbeat.memory.used_gb += need_mem;
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
