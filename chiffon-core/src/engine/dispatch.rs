//! Dispatch: a step marked `dispatched` with its `work_request` in the outbox, in one group
//! commit, then published (the broker's confirms awaited together).
//!
//! Two ways in. The dispatcher claims ready steps (oldest first, with a lease, so instances
//! sharing a database never take the same one) and chooses an agent for those that need
//! resources. A plan queued by its auto-approval whose first step needs none goes straight
//! to its agent type's queue: the step is stored already marked `dispatched`, with its
//! message and the request `running`, in the transaction that queues the plan, so it never
//! waits as `ready` for a dispatcher's round. Either way the message is in the outbox with
//! its mark, so a crash before the publish leaves it to the relay.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chiffon_protocol::{Envelope, Message, Resources, WorkRequest};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::runtime::chrono_dur;
use super::*;
use crate::audit::AuditEvent;
use crate::model::{
    AgentRecord, GroupWrite, NewAuditEntry, OutboxMessage, PlanStep, RequestPatch, RequestStatus,
    StepPatch, StepStatus, Written,
};

/// How long a claim on a ready step lasts before another instance may take it.
const CLAIM_LEASE: Duration = Duration::from_secs(30);

/// Whether a step needs the dispatcher to choose an agent for it (GPU, memory, a desktop),
/// rather than going to its agent type's shared queue.
pub(super) fn needs_agent(resources: &Resources, agent_type: &str) -> bool {
    resources.gpu || resources.memory_gb > 0.0 || agent_type == "desktop"
}

/// A step about to be marked dispatched: its `work_request` and what its mark records.
pub(super) struct Outgoing {
    task_id: Uuid,
    seq: u32,
    /// Memory promised to the chosen agent (GiB).
    memory_gb: f64,
    request_id: Uuid,
    queue: String,
    agent_id: Option<String>,
    needs: bool,
    now: DateTime<Utc>,
    env: Envelope,
    /// The mark's group writes, taken once ([`Engine::dispatch_writes`]): the step
    /// `dispatched` with its entry, then its message into the outbox (none if the message
    /// could not be serialized).
    mark: Option<GroupWrite>,
    send: Option<GroupWrite>,
}

/// What a step's work message is built from: a stored step, or a plan's first step
/// about to be stored.
struct StepToSend<'a> {
    task_id: Uuid,
    seq: u32,
    action: &'a str,
    parameters: &'a Map<String, Value>,
    agent_type: &'a str,
    resources: &'a Resources,
    /// The attempt this dispatch makes (one more than the step's).
    attempt: u32,
}

/// Where a step goes: the queue, the agent chosen (if any) and the broker user the attempt
/// is bound to (an agent's own queue).
struct Route {
    queue: String,
    agent_id: Option<String>,
    bound_user: Option<String>,
}

impl Engine {
    /// Builds a step's `work_request` and its mark (with the `dispatched` entry) and outbox
    /// row.
    fn outgoing(&self, step: StepToSend<'_>, request: &Request, route: Route) -> Outgoing {
        let cfg = &self.inner.config.dispatch;
        let now = Utc::now();
        let timeout = self
            .inner
            .catalog
            .actions
            .get(step.action)
            .and_then(|a| a.timeout_seconds)
            .map(Duration::from_secs)
            .unwrap_or(cfg.step_timeout);
        let work = WorkRequest {
            agent_type: step.agent_type.to_string(),
            task_id: step.task_id,
            action: step.action.to_string(),
            parameters: step.parameters.clone(),
            resources_required: step.resources.clone(),
            dry_run: request.dry_run,
            attempt: step.attempt,
            timeout_seconds: Some(timeout.as_secs().max(1)),
        };
        let env = Envelope::new(
            request.trace_id.clone(),
            Some(request.id),
            Message::WorkRequest(work),
        );
        let mark = GroupWrite::Step {
            task_id: step.task_id,
            from: vec![StepStatus::Ready],
            to: StepStatus::Dispatched,
            patch: Box::new(StepPatch {
                attempt: Some(step.attempt),
                // A queue of an agent's own: the attempt is bound to its broker user in the
                // mark itself, so it is never published unbound.
                reported_by: route.bound_user.clone(),
                queue: Some(route.queue.clone()),
                agent_id: route.agent_id.clone(),
                dispatched_at: Some(now),
                deadline_at: Some(now + chrono_dur(timeout)),
                ..Default::default()
            }),
            logs: Vec::new(),
            audit: vec![NewAuditEntry {
                request_id: Some(request.id),
                actor: self.inner.config.instance_id.clone(),
                event: AuditEvent::Dispatched,
                details: json!({ "task_id": step.task_id, "seq": step.seq, "action": step.action, "queue": route.queue, "agent_id": route.agent_id, "attempt": step.attempt }),
            }],
        };
        // The message goes into the outbox with its mark: a crash before the publish leaves
        // it there for the relay ([`Engine::relay_outbox`]), not a step `dispatched` with no
        // message anywhere until its deadline.
        let send = match serde_json::to_string(&env) {
            Ok(body) => Some(GroupWrite::Send(OutboxMessage {
                id: env.message_id,
                task_id: step.task_id,
                attempt: step.attempt,
                queue: route.queue.clone(),
                body,
                created_at: now,
            })),
            Err(e) => {
                tracing::error!(task = %step.task_id, error = %e, "a work message could not be stored in the outbox; it is published without it");
                None
            }
        };
        Outgoing {
            task_id: step.task_id,
            seq: step.seq,
            memory_gb: step.resources.memory_gb,
            request_id: request.id,
            queue: route.queue,
            agent_id: route.agent_id,
            needs: needs_agent(step.resources, step.agent_type),
            now,
            env,
            mark: Some(mark),
            send,
        }
    }

    /// The group writes of these dispatches, taken out of them: every mark, then every
    /// outbox row. Returns them with the number of marks.
    fn dispatch_writes(outgoing: &mut [Outgoing]) -> (Vec<GroupWrite>, usize) {
        let mut writes: Vec<GroupWrite> =
            outgoing.iter_mut().filter_map(|o| o.mark.take()).collect();
        let marks = writes.len();
        writes.extend(outgoing.iter_mut().filter_map(|o| o.send.take()));
        (writes, marks)
    }

    /// The plan's first step, when it can go straight to its agent type's queue as the plan
    /// is queued (it needs no agent chosen for it): its dispatch, under a task id chosen now
    /// (the store gives the step that id).
    pub(super) fn dispatch_first(&self, request: &Request, first: &PlanStep) -> Option<Outgoing> {
        if needs_agent(&first.resources, &first.agent_type) {
            return None;
        }
        let queue = self
            .inner
            .transport
            .topology()
            .agent_queue(&first.agent_type);
        Some(self.outgoing(
            StepToSend {
                task_id: Uuid::now_v7(),
                seq: 0,
                action: &first.action,
                parameters: &first.parameters,
                agent_type: &first.agent_type,
                resources: &first.resources,
                attempt: 1,
            },
            request,
            Route {
                queue,
                agent_id: None,
                bound_user: None,
            },
        ))
    }

    /// Queues a planned request (its plan in `patch`) and, with `first`, dispatches its first
    /// step in the same transaction: the step stored `dispatched` under `first`'s task id,
    /// its message in the outbox, the request `running`. Then publishes it. Without `first`,
    /// or if its mark did not apply, the first step waits `ready` for the dispatcher.
    pub(super) async fn queue_planned(
        &self,
        id: Uuid,
        from: RequestStatus,
        mut patch: RequestPatch,
        first: Option<Outgoing>,
    ) -> Result<Request, EngineError> {
        let Some(mut first) = first else {
            return self
                .set_status(id, from, RequestStatus::Queued, patch)
                .await;
        };
        patch.first_step_id = Some(first.task_id);
        let mut writes = vec![GroupWrite::Transition {
            id,
            from,
            to: RequestStatus::Queued,
            patch: Box::new(patch),
        }];
        let (dispatch, _) = Self::dispatch_writes(std::slice::from_mut(&mut first));
        let sends = dispatch.len() - 1;
        writes.extend(dispatch);
        writes.push(GroupWrite::Transition {
            id,
            from: RequestStatus::Queued,
            to: RequestStatus::Running,
            patch: Box::default(),
        });
        let mut slots = self.group_writes(writes).await.into_iter();
        let queued = match slots.next() {
            Some(Ok(Written::Request(r))) => r,
            Some(Err(e)) => return Err(e.into()),
            _ => {
                return Err(
                    StoreError::Corrupt("a status change without its outcome".into()).into(),
                )
            }
        };
        self.changed(&queued);
        let marked = matches!(slots.next(), Some(Ok(_)));
        // Past the outbox rows: the move to `running`.
        let running = match slots.nth(sends) {
            Some(Ok(Written::Request(r))) => {
                self.changed(&r);
                r
            }
            _ => queued,
        };
        if marked {
            self.publish_marked(vec![first]).await;
        } else {
            // Queued with its first step ready: the dispatcher sends it.
            self.inner.wake.notify_one();
        }
        Ok(running)
    }

    /// Dispatch rounds until no more ready steps are claimable.
    pub(super) async fn dispatch_all(&self) -> Result<(), EngineError> {
        loop {
            let (claimed, _) = self.dispatch_round().await?;
            if claimed < self.inner.config.dispatch.batch as usize {
                return Ok(());
            }
        }
    }

    /// Claims ready steps (oldest first) and dispatches each to an agent with room. Steps
    /// that need resources no fresh heartbeat shows are released, and so are the
    /// resource-needing steps after them, so capacity goes to them in arrival order.
    /// Returns (claimed, dispatched).
    pub(super) async fn dispatch_round(&self) -> Result<(usize, usize), EngineError> {
        let cfg = &self.inner.config.dispatch;
        let owner = &self.inner.config.instance_id;
        let steps = self
            .inner
            .store
            .claim_ready_steps(owner, cfg.batch, CLAIM_LEASE)
            .await?;
        if steps.is_empty() {
            return Ok((0, 0));
        }
        let claimed = steps.len();
        let needs_agents = steps
            .iter()
            .any(|s| needs_agent(&s.resources, &s.agent_type));
        let mut agents: Vec<AgentRecord> = if needs_agents {
            let fresh = Utc::now() - chrono_dur(cfg.heartbeat_max_age);
            self.inner
                .store
                .agents()
                .await?
                .into_iter()
                .filter(|a| a.last_seen >= fresh)
                .collect()
        } else {
            Vec::new()
        };
        // A heartbeat older than a dispatch does not show what that dispatch takes yet.
        if let (true, Ok(mut reserved)) = (needs_agents, self.inner.reservations.lock()) {
            // Agents gone silent no longer get work; forget what was promised to them.
            reserved
                .retain(|id, list| !list.is_empty() && agents.iter().any(|a| &a.agent_id == id));
            for a in agents.iter_mut() {
                if let Some(list) = reserved.get_mut(&a.agent_id) {
                    list.retain(|(_, _, at)| *at > a.last_seen);
                    if let Some(m) = a.heartbeat.memory.as_mut() {
                        m.used_gb += list.iter().map(|r| r.1).sum::<f64>();
                    }
                    a.heartbeat.running_tasks += list.len() as u32;
                }
            }
        }
        // The claimed steps' requests, read together.
        let mut ids: Vec<Uuid> = steps.iter().map(|s| s.request_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let requests: HashMap<Uuid, Request> = self
            .inner
            .store
            .get_requests(&ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let mut blocked = false;
        let mut outgoing: Vec<Outgoing> = Vec::with_capacity(claimed);
        let topology = self.inner.transport.topology().clone();
        // An error once a step is marked `dispatched` must not strand it, nor the steps
        // marked before it: the loop stops, what is marked is published, then the error is
        // returned.
        let mut failure: Option<EngineError> = None;
        for step in steps {
            let Some(request) = requests.get(&step.request_id) else {
                // Its request is gone: the claim lapses and nothing runs.
                continue;
            };
            if !matches!(
                request.status,
                RequestStatus::Queued | RequestStatus::Running
            ) {
                let patch = StepPatch {
                    finished_at: Some(Utc::now()),
                    ..Default::default()
                };
                let _ = self
                    .inner
                    .store
                    .update_step(
                        step.task_id,
                        &[StepStatus::Ready],
                        StepStatus::Skipped,
                        &patch,
                    )
                    .await;
                continue;
            }
            let route = if needs_agent(&step.resources, &step.agent_type) {
                let chosen = if blocked {
                    None
                } else {
                    crate::scheduler::choose_agent(&mut agents, &step)
                };
                match chosen {
                    Some(a) => {
                        // A queue of that agent's own: the attempt is bound to its broker
                        // user from the start, so no other agent can report on it.
                        let (q, own) = if step.agent_type == "desktop" {
                            (topology.desktop_queue(&a.hostname), true)
                        } else {
                            match &a.heartbeat.queue {
                                Some(q) if *q != topology.agent_queue(&step.agent_type) => {
                                    (q.clone(), true)
                                }
                                _ => (topology.agent_queue(&step.agent_type), false),
                            }
                        };
                        Route {
                            queue: q,
                            agent_id: Some(a.agent_id.clone()),
                            bound_user: if own { a.broker_user.clone() } else { None },
                        }
                    }
                    None => {
                        blocked = true;
                        if let Err(e) = self.inner.store.release_step(step.task_id, owner).await {
                            failure = Some(e.into());
                            break;
                        }
                        continue;
                    }
                }
            } else {
                Route {
                    queue: topology.agent_queue(&step.agent_type),
                    agent_id: None,
                    bound_user: None,
                }
            };
            outgoing.push(self.outgoing(
                StepToSend {
                    task_id: step.task_id,
                    seq: step.seq,
                    action: &step.action,
                    parameters: &step.parameters,
                    agent_type: &step.agent_type,
                    resources: &step.resources,
                    attempt: step.attempt + 1,
                },
                request,
                route,
            ));
        }
        // Every mark in one group commit, each with its `dispatched` entry and its outbox
        // row, and the requests' first steps moving them to `running`: no transaction per
        // step.
        let (mut writes, marks) = Self::dispatch_writes(&mut outgoing);
        let mut starting: Vec<Uuid> = outgoing
            .iter()
            .filter(|o| {
                requests
                    .get(&o.request_id)
                    .is_some_and(|r| r.status == RequestStatus::Queued)
            })
            .map(|o| o.request_id)
            .collect();
        starting.sort_unstable();
        starting.dedup();
        let transitions = writes.len();
        writes.extend(starting.iter().map(|id| GroupWrite::Transition {
            id: *id,
            from: RequestStatus::Queued,
            to: RequestStatus::Running,
            patch: Box::default(),
        }));
        let written = self.group_writes(writes).await;
        let marked = &written[..marks];
        let started = &written[transitions..];
        for (id, r) in starting.iter().zip(started) {
            match r {
                Ok(Written::Request(r)) => self.changed(r),
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                // The step is marked: it is published whatever the request's status says
                // (a result ends a `queued` request as well as a `running` one).
                Err(e) => {
                    tracing::warn!(error = %e, request = %id, "could not mark the request running; its step is dispatched anyway")
                }
            }
        }
        let mut ready = Vec::with_capacity(outgoing.len());
        for (o, m) in outgoing.into_iter().zip(marked) {
            match m {
                Ok(_) => {}
                // Someone else moved it on (cancelled, another instance).
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(EngineError::Store(super::lifecycle::each_waiter(e)));
                    }
                    continue;
                }
            }
            ready.push(o);
        }
        let dispatched = self.publish_marked(ready).await;
        match failure {
            Some(e) => Err(e),
            None => Ok((claimed, dispatched)),
        }
    }

    /// Publishes the work messages of steps marked `dispatched`, all at once (the broker
    /// confirms them together, instead of one round trip per step). A step whose message
    /// was not published is made ready again. Returns how many were published.
    async fn publish_marked(&self, outgoing: Vec<Outgoing>) -> usize {
        let published =
            futures::future::join_all(outgoing.iter().map(|o| self.publish_to(&o.queue, &o.env)))
                .await;
        let mut dispatched = 0;
        // Outbox rows done with: confirmed by the broker, or their steps ready again.
        let mut done: Vec<Uuid> = Vec::with_capacity(outgoing.len());
        for (o, sent) in outgoing.into_iter().zip(published) {
            if let Err(e) = sent {
                // Not published: make it ready again (the attempt stays counted).
                match self.unmark_dispatched(o.task_id, o.now).await {
                    Ok(()) => {
                        done.push(o.env.message_id);
                        tracing::warn!(error = %e, task = %o.task_id, "dispatch publish failed; will retry")
                    }
                    Err(store) => {
                        tracing::error!(error = %e, %store, task = %o.task_id, "dispatch publish failed and the step could not be made ready again; the outbox relay publishes it")
                    }
                }
                continue;
            }
            done.push(o.env.message_id);
            dispatched += 1;
            if let (Some(agent), true) = (&o.agent_id, o.needs) {
                if let Ok(mut reserved) = self.inner.reservations.lock() {
                    reserved.entry(agent.clone()).or_default().push((
                        o.task_id,
                        o.memory_gb,
                        o.now,
                    ));
                }
            }
            self.inner
                .metrics
                .dispatched
                .fetch_add(1, Ordering::Relaxed);
            self.inner.events.publish(EngineEvent::Step {
                request_id: o.request_id,
                task_id: o.task_id,
                seq: o.seq,
                status: StepStatus::Dispatched,
                at: o.now,
            });
        }
        if !done.is_empty() {
            // Not waited for: a row left behind is found by the relay, which sees its step
            // moved on (or publishes a copy the agent and the engine recognise).
            let engine = self.clone();
            self.inner.tasks.spawn(async move {
                if let Err(e) = engine.group_write(GroupWrite::Sent(done)).await {
                    tracing::warn!(error = %e, "sent messages not cleared from the outbox; the relay clears them");
                }
            });
        }
        dispatched
    }

    /// Makes a step marked `dispatched` but never published `ready` again (after a second;
    /// the attempt stays counted). The broker and the database often fail together, so an
    /// outage is retried: the step must not stay `dispatched` with no message anywhere
    /// (only its timeout would free it). Someone else having moved it on is fine.
    async fn unmark_dispatched(
        &self,
        task_id: Uuid,
        ready_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let back = StepPatch {
            not_before: Some(Utc::now() + chrono::TimeDelta::seconds(1)),
            ready_at: Some(ready_at),
            ..Default::default()
        };
        match crate::engine::with_store_retry(|| {
            self.inner.store.update_step(
                task_id,
                &[StepStatus::Dispatched],
                StepStatus::Ready,
                &back,
            )
        })
        .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
