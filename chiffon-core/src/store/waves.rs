//! How a group commit's writes are applied in few statements: in waves of independent
//! writes, each wave one statement per kind of write.
//!
//! A group holds the writes of many callers, each a short sequence (a result and the
//! `Advance` after it, a dispatch's marks and their outbox messages). Applied one by one they
//! cost a round trip or two each, and the group writer (one group at a time) spends its
//! time waiting on them. Writes that touch different requests and
//! steps do not depend on each other, so their order inside the group does not matter: a
//! write goes into the first wave after every earlier write it depends on, and each wave
//! changes all its rows of one kind in one multi-row statement.
//!
//! A write depends on an earlier one that names the same request, step or message (a
//! write's audit entries name their request too, so a request's entries keep the group's
//! order). The writes that read or change a request's existing steps by the request (an
//! `Advance`, and a `Transition` to `queued` without a plan, which makes the first pending
//! step ready) depend on every earlier `Step`, since a `Step` does not name its request;
//! inside a wave they are applied before the `Step`s, so a step change listed after them
//! stays after them. A `Transition` that stores a plan creates its steps, so it names the
//! one step id its caller may know before (`first_step_id`). Log lines follow the earlier
//! writes of their step. Audit entries are appended in the order the writes are applied.

use std::collections::HashMap;

use uuid::Uuid;

use crate::model::{GroupWrite, RequestPatch, RequestStatus};

/// The kinds of writes, in the order they are applied inside a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Create,
    Claim,
    Transition,
    Advance,
    Step,
    Send,
    Preview,
    Commit,
    Logs,
    Sent,
    Audit,
}

/// A wave: for each kind present, the indices of its writes, in the group's order.
pub(crate) type Wave = Vec<(Kind, Vec<usize>)>;

fn kind(w: &GroupWrite) -> Kind {
    match w {
        GroupWrite::Create { .. } => Kind::Create,
        GroupWrite::ClaimPlanning { .. } => Kind::Claim,
        GroupWrite::Transition { .. } => Kind::Transition,
        GroupWrite::Advance { .. } => Kind::Advance,
        GroupWrite::Step { .. } => Kind::Step,
        GroupWrite::Send(_) => Kind::Send,
        GroupWrite::Preview { .. } => Kind::Preview,
        GroupWrite::Commit { .. } => Kind::Commit,
        GroupWrite::Logs(_) => Kind::Logs,
        GroupWrite::Sent(_) => Kind::Sent,
        GroupWrite::Audit(_) => Kind::Audit,
    }
}

/// The requests, steps and messages a write names, and the requests its audit entries are
/// about (so a request's entries keep the group's order).
fn keys(w: &GroupWrite) -> Vec<Uuid> {
    let mut keys = own_keys(w);
    let entries = match w {
        GroupWrite::Create { audit, .. }
        | GroupWrite::Step { audit, .. }
        | GroupWrite::Advance { audit, .. }
        | GroupWrite::Commit { audit, .. }
        | GroupWrite::Preview { audit, .. } => audit.as_slice(),
        GroupWrite::Transition { patch, .. } => patch.audit.as_slice(),
        _ => &[],
    };
    keys.extend(entries.iter().filter_map(|e| e.request_id));
    keys
}

fn own_keys(w: &GroupWrite) -> Vec<Uuid> {
    match w {
        GroupWrite::Create { request, .. } => vec![request.id],
        GroupWrite::Transition { id, patch, .. } => {
            std::iter::once(*id).chain(patch.first_step_id).collect()
        }
        GroupWrite::ClaimPlanning { id, .. } | GroupWrite::Commit { id, .. } => vec![*id],
        GroupWrite::Advance { request_id, .. } => vec![*request_id],
        GroupWrite::Step { task_id, .. } | GroupWrite::Preview { task_id, .. } => vec![*task_id],
        GroupWrite::Send(m) => vec![m.task_id],
        GroupWrite::Sent(ids) => ids.clone(),
        // Each line after the earlier writes of its step (or of its request, for the
        // engine's own lines), so a step's lines keep the order they were reported in.
        GroupWrite::Logs(lines) => lines
            .iter()
            .map(|l| l.task_id.unwrap_or(l.request_id))
            .collect(),
        GroupWrite::Audit(entries) => entries.iter().filter_map(|e| e.request_id).collect(),
    }
}

/// Whether a write reads or changes a request's existing steps through the request (which
/// a `Step` does not name): an `Advance`, or a `Transition` to `queued` that makes the first
/// pending step ready (one storing a plan creates the steps instead).
fn by_request_steps(w: &GroupWrite) -> bool {
    match w {
        GroupWrite::Advance { .. } => true,
        GroupWrite::Transition { to, patch, .. } => {
            *to == RequestStatus::Queued && patch.plan.is_none()
        }
        _ => false,
    }
}

/// Whether write `i` is a planning claim stored by the `Create` just before it (a request
/// born claimed): it is applied with that `Create`, not on its own.
pub(crate) fn born_claim(writes: &[GroupWrite], i: usize) -> bool {
    match (i.checked_sub(1).and_then(|p| writes.get(p)), writes.get(i)) {
        (Some(GroupWrite::Create { request, .. }), Some(GroupWrite::ClaimPlanning { id, .. })) => {
            request.id == *id
        }
        _ => false,
    }
}

/// The moves to `running` that go with the plan queued before them: for a `Transition` to
/// `queued` storing a plan whose first step the engine chose (`i`), followed only by that
/// step's dispatch (its `Step` and `Send` writes) and then by the request's bare move from
/// `queued` to `running` (`j`), `i → j`. The request's row is written once, `running`, and
/// each of the two writes answers as if it had been applied alone (the queued plan
/// dispatched directly: one update of the row fewer).
pub(crate) fn then_running(writes: &[GroupWrite]) -> HashMap<usize, usize> {
    let mut out = HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        let GroupWrite::Transition { id, to, patch, .. } = w else {
            continue;
        };
        let (RequestStatus::Queued, Some(_), Some(first)) = (*to, &patch.plan, patch.first_step_id)
        else {
            continue;
        };
        let mut j = i + 1;
        while let Some(GroupWrite::Step { task_id, .. }) = writes.get(j) {
            if *task_id != first {
                break;
            }
            j += 1;
        }
        while let Some(GroupWrite::Send(m)) = writes.get(j) {
            if m.task_id != first {
                break;
            }
            j += 1;
        }
        if let Some(GroupWrite::Transition {
            id: then,
            from: RequestStatus::Queued,
            to: RequestStatus::Running,
            patch: bare,
        }) = writes.get(j)
        {
            // Every field named, so a field added to the patch is considered here.
            let RequestPatch {
                plan,
                approver,
                approval_comment,
                error,
                commit_id,
                first_step_id,
                audit,
            } = &**bare;
            let bare = plan.is_none()
                && approver.is_none()
                && approval_comment.is_none()
                && error.is_none()
                && commit_id.is_none()
                && first_step_id.is_none()
                && audit.is_empty();
            if then == id && bare {
                out.insert(i, j);
            }
        }
    }
    out
}

/// The waves `writes` are applied in (see the module docs). Every write is in exactly one
/// wave, except a claim born with its `Create` ([`born_claim`]), which goes with it, and a
/// move to `running` that goes with its queued plan (`riders`, as [`then_running`] finds
/// them).
pub(crate) fn plan(writes: &[GroupWrite], riders: &HashMap<usize, usize>) -> Vec<Wave> {
    let mut last: HashMap<Uuid, usize> = HashMap::new();
    // The wave after the latest `Step` so far (0 before any).
    let mut after_steps = 0;
    let mut waves: Vec<Vec<(Kind, usize)>> = Vec::new();
    let rides: std::collections::HashSet<usize> = riders.values().copied().collect();
    for (i, w) in writes.iter().enumerate() {
        if born_claim(writes, i) || rides.contains(&i) {
            continue;
        }
        let keys = keys(w);
        let kind = kind(w);
        let mut wave = keys
            .iter()
            .filter_map(|k| last.get(k).map(|w| w + 1))
            .max()
            .unwrap_or(0);
        if by_request_steps(w) {
            wave = wave.max(after_steps);
        }
        for k in keys {
            last.insert(k, wave);
        }
        if kind == Kind::Step {
            after_steps = after_steps.max(wave + 1);
        }
        if waves.len() <= wave {
            waves.resize_with(wave + 1, Vec::new);
        }
        waves[wave].push((kind, i));
    }
    waves
        .into_iter()
        .map(|mut wave| {
            // Stable: each kind's writes keep the group's order.
            wave.sort_by_key(|(k, _)| *k);
            let mut out: Wave = Vec::new();
            for (k, i) in wave {
                match out.last_mut() {
                    Some((last, idx)) if *last == k => idx.push(i),
                    _ => out.push((k, vec![i])),
                }
            }
            out
        })
        .collect()
}

/// The chain positions a batch's rows take if all of them apply: row `r` carrying `counts[r]`
/// entries names its newest, `None` when it carries none. `appended` entries precede the
/// batch, after the head at `base`.
pub(crate) fn assumed_seqs(base: i64, appended: usize, counts: &[usize]) -> Vec<Option<i64>> {
    let mut at = base + appended as i64;
    counts
        .iter()
        .map(|&n| {
            at += n as i64;
            (n > 0).then_some(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;
    use crate::model::{NewAuditEntry, NewLogLine, RequestStatus, StepStatus};

    /// The waves of `writes`, their riders found as a group commit finds them.
    fn plan(writes: &[GroupWrite]) -> Vec<Wave> {
        super::plan(writes, &then_running(writes))
    }

    fn step(task: Uuid) -> GroupWrite {
        GroupWrite::Step {
            task_id: task,
            from: vec![StepStatus::Running],
            to: StepStatus::Completed,
            patch: Box::default(),
            logs: Vec::new(),
            audit: Vec::new(),
        }
    }

    fn advance(request: Uuid) -> GroupWrite {
        GroupWrite::Advance {
            request_id: request,
            after_seq: 0,
            audit: Vec::new(),
        }
    }

    fn transition(id: Uuid) -> GroupWrite {
        GroupWrite::Transition {
            id,
            from: RequestStatus::Queued,
            to: RequestStatus::Running,
            patch: Box::new(RequestPatch::default()),
        }
    }

    /// An approval: queued, its first pending step made ready.
    fn approval(id: Uuid) -> GroupWrite {
        GroupWrite::Transition {
            id,
            from: RequestStatus::AwaitingApproval,
            to: RequestStatus::Queued,
            patch: Box::new(RequestPatch::default()),
        }
    }

    /// A plan queued with its first step's id chosen, that step marked dispatched, its
    /// message sent and the request running: one request's direct dispatch.
    fn direct_dispatch(r: Uuid, t: Uuid) -> Vec<GroupWrite> {
        let plan = crate::model::Plan {
            summary: "s".into(),
            steps: Vec::new(),
            risks: Vec::new(),
            estimated_cost_usd: 0.0,
            llm_cost_usd: 0.0,
            provider: "offline".into(),
            model: "m".into(),
            cached: false,
            skipped: Vec::new(),
        };
        let mut mark = step(t);
        if let Some(audit) = mark.audit_mut() {
            audit.push(entry(r));
        }
        vec![
            GroupWrite::Transition {
                id: r,
                from: RequestStatus::Planning,
                to: RequestStatus::Queued,
                patch: Box::new(RequestPatch {
                    plan: Some(plan),
                    first_step_id: Some(t),
                    audit: vec![entry(r)],
                    ..Default::default()
                }),
            },
            mark,
            GroupWrite::Send(crate::model::OutboxMessage {
                id: Uuid::now_v7(),
                task_id: t,
                attempt: 1,
                queue: "q".into(),
                body: "{}".into(),
                created_at: chrono::Utc::now(),
            }),
            transition(r),
        ]
    }

    fn entry(request: Uuid) -> NewAuditEntry {
        NewAuditEntry {
            request_id: Some(request),
            actor: "a".into(),
            event: AuditEvent::Received,
            details: serde_json::json!({}),
        }
    }

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    #[test]
    fn results_of_many_requests_take_two_waves() {
        let (t, r) = (ids(4), ids(4));
        let writes: Vec<_> = (0..4).flat_map(|i| [step(t[i]), advance(r[i])]).collect();
        let waves = plan(&writes);
        assert_eq!(
            waves,
            vec![
                vec![(Kind::Step, vec![0, 2, 4, 6])],
                vec![(Kind::Advance, vec![1, 3, 5, 7])],
            ]
        );
    }

    #[test]
    fn writes_naming_the_same_row_keep_their_order() {
        let t = Uuid::now_v7();
        let r = Uuid::now_v7();
        let writes = vec![step(t), step(t), approval(r), transition(r)];
        let waves = plan(&writes);
        assert_eq!(
            waves,
            vec![
                vec![(Kind::Step, vec![0])],
                vec![(Kind::Step, vec![1])],
                // The approval readies a step: after every earlier step. The next change
                // after its own first one.
                vec![(Kind::Transition, vec![2])],
                vec![(Kind::Transition, vec![3])],
            ]
        );
    }

    #[test]
    fn a_status_change_that_touches_no_step_does_not_wait_for_steps() {
        let (t, r) = (ids(2), ids(2));
        let writes = vec![step(t[0]), transition(r[0]), step(t[1]), transition(r[1])];
        assert_eq!(
            plan(&writes),
            vec![vec![
                (Kind::Transition, vec![1, 3]),
                (Kind::Step, vec![0, 2])
            ]]
        );
    }

    #[test]
    fn direct_dispatches_of_many_requests_take_three_waves() {
        let (t, r) = (ids(3), ids(3));
        let writes: Vec<_> = (0..3).flat_map(|i| direct_dispatch(r[i], t[i])).collect();
        assert_eq!(
            plan(&writes),
            vec![
                vec![(Kind::Transition, vec![0, 4, 8])],
                vec![(Kind::Step, vec![1, 5, 9])],
                // The moves to `running` (3, 7, 11) ride with their queued plans.
                vec![(Kind::Send, vec![2, 6, 10])],
            ]
        );
        assert_eq!(
            then_running(&writes),
            HashMap::from([(0, 3), (4, 7), (8, 11)])
        );
        // An earlier change of the step the plan creates stays before it.
        let mut writes = vec![step(t[0])];
        writes.extend(direct_dispatch(r[0], t[0]));
        assert_eq!(plan(&writes)[0], vec![(Kind::Step, vec![0])]);
        assert_eq!(plan(&writes)[1], vec![(Kind::Transition, vec![1])]);
    }

    #[test]
    fn only_a_bare_move_to_running_right_after_its_dispatch_rides_with_the_plan() {
        let (t, r) = (ids(2), ids(2));
        let base = direct_dispatch(r[0], t[0]);
        assert_eq!(then_running(&base), HashMap::from([(0, 3)]));
        // Anything else between the plan and the move: each applied on its own.
        let mut between = base.clone();
        between.insert(3, step(t[1]));
        assert!(then_running(&between).is_empty());
        assert_eq!(
            plan(&between)
                .concat()
                .iter()
                .map(|(_, i)| i.len())
                .sum::<usize>(),
            5
        );
        // A move that records something of its own, or is another request's.
        let mut own = base.clone();
        if let GroupWrite::Transition { patch, .. } = &mut own[3] {
            patch.audit.push(entry(r[0]));
        }
        assert!(then_running(&own).is_empty());
        let mut other = base.clone();
        if let GroupWrite::Transition { id, .. } = &mut other[3] {
            *id = r[1];
        }
        assert!(then_running(&other).is_empty());
        // A plan whose first step the store chooses is not dispatched with it.
        let mut chosen_later = base;
        if let GroupWrite::Transition { patch, .. } = &mut chosen_later[0] {
            patch.first_step_id = None;
        }
        assert!(then_running(&chosen_later).is_empty());
    }

    #[test]
    fn a_step_after_an_advance_in_its_wave_is_applied_after_it() {
        let (t, r) = (ids(2), ids(2));
        let writes = vec![advance(r[0]), step(t[0]), advance(r[1])];
        let waves = plan(&writes);
        // The second advance follows the step listed before it; the first precedes it.
        assert_eq!(
            waves,
            vec![
                vec![(Kind::Advance, vec![0]), (Kind::Step, vec![1])],
                vec![(Kind::Advance, vec![2])],
            ]
        );
    }

    #[test]
    fn a_claim_born_with_its_request_goes_with_it() {
        let r = Uuid::now_v7();
        let create = GroupWrite::Create {
            request: Box::new(crate::model::NewRequest {
                id: r,
                trace_id: String::new(),
                text: "x".into(),
                requester: "a".into(),
                submitted_by: "a".into(),
                dry_run: false,
            }),
            audit: Vec::new(),
        };
        let claim = GroupWrite::ClaimPlanning {
            id: r,
            owner: "me".into(),
            lease: std::time::Duration::from_secs(30),
        };
        let writes = vec![create, claim.clone(), claim];
        assert!(born_claim(&writes, 1));
        assert!(!born_claim(&writes, 2));
        assert_eq!(
            plan(&writes),
            vec![vec![(Kind::Create, vec![0])], vec![(Kind::Claim, vec![2])]]
        );
    }

    #[test]
    fn entries_depend_on_their_request_and_lines_on_their_step() {
        let (r, t) = (Uuid::now_v7(), Uuid::now_v7());
        let entry = entry(r);
        let line = |task_id| NewLogLine {
            request_id: r,
            task_id,
            at: chrono::Utc::now(),
            kind: "log".into(),
            progress: None,
            message: "m".into(),
        };
        let writes = vec![
            transition(r),
            GroupWrite::Audit(vec![entry]),
            step(t),
            GroupWrite::Logs(vec![line(Some(t))]),
            GroupWrite::Logs(vec![line(None)]),
            GroupWrite::Sent(vec![Uuid::now_v7()]),
        ];
        assert_eq!(
            plan(&writes),
            vec![
                vec![
                    (Kind::Transition, vec![0]),
                    (Kind::Step, vec![2]),
                    (Kind::Sent, vec![5])
                ],
                vec![(Kind::Logs, vec![3]), (Kind::Audit, vec![1])],
                vec![(Kind::Logs, vec![4])],
            ]
        );
    }

    #[test]
    fn a_step_with_entries_of_a_request_follows_that_request_s_entries() {
        let (r, t) = (Uuid::now_v7(), Uuid::now_v7());
        let entry = entry(r);
        let mut result = step(t);
        if let Some(audit) = result.audit_mut() {
            audit.push(entry.clone());
        }
        let writes = vec![GroupWrite::Audit(vec![entry]), result, step(Uuid::now_v7())];
        assert_eq!(
            plan(&writes),
            vec![
                vec![(Kind::Step, vec![2]), (Kind::Audit, vec![0])],
                vec![(Kind::Step, vec![1])],
            ]
        );
    }

    #[test]
    fn seqs_assume_every_row_applies() {
        assert_eq!(
            assumed_seqs(10, 2, &[1, 0, 2]),
            vec![Some(13), None, Some(15)]
        );
    }
}
