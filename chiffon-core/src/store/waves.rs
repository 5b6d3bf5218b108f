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
//! order), and the writes that read or change a request's steps by the request
//! (`Transition`, which stores a plan or makes the first step ready, and `Advance`) depend
//! on every earlier `Step`; inside a wave they are applied before the `Step`s, so a step
//! change listed after them stays after them. Log lines follow the earlier writes of their
//! step. Audit entries are appended in the order the writes are applied.

use std::collections::HashMap;

use uuid::Uuid;

use crate::model::GroupWrite;

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
        GroupWrite::ClaimPlanning { id, .. }
        | GroupWrite::Transition { id, .. }
        | GroupWrite::Commit { id, .. } => vec![*id],
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

/// The waves `writes` are applied in (see the module docs). Every write is in exactly one
/// wave, except a claim born with its `Create` ([`born_claim`]), which goes with it.
pub(crate) fn plan(writes: &[GroupWrite]) -> Vec<Wave> {
    let mut last: HashMap<Uuid, usize> = HashMap::new();
    // The wave after the latest `Step` so far (0 before any).
    let mut after_steps = 0;
    let mut waves: Vec<Vec<(Kind, usize)>> = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        if born_claim(writes, i) {
            continue;
        }
        let keys = keys(w);
        let kind = kind(w);
        let mut wave = keys
            .iter()
            .filter_map(|k| last.get(k).map(|w| w + 1))
            .max()
            .unwrap_or(0);
        if matches!(kind, Kind::Transition | Kind::Advance) {
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
    use crate::model::{NewAuditEntry, NewLogLine, RequestPatch, RequestStatus, StepStatus};

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
        let writes = vec![step(t), step(t), transition(r), transition(r)];
        let waves = plan(&writes);
        assert_eq!(
            waves,
            vec![
                vec![(Kind::Step, vec![0])],
                vec![(Kind::Step, vec![1])],
                // After every earlier step, then after its own first change.
                vec![(Kind::Transition, vec![2])],
                vec![(Kind::Transition, vec![3])],
            ]
        );
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
