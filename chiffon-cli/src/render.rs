//! Human-readable output, and live progress (a bar on a terminal, plain lines otherwise).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use chiffon_core::catalog::{Catalog, ParamType};
use chiffon_server::dto::{
    AgentsDto, CostsDto, EventDto, LogsDto, PlanDto, RequestDto, RequestListDto, StatusDto,
};
use indicatif::{ProgressBar, ProgressStyle};

pub fn status_str(s: StatusDto) -> &'static str {
    match s {
        StatusDto::Planning => "planning",
        StatusDto::AwaitingApproval => "awaiting_approval",
        StatusDto::Queued => "queued",
        StatusDto::Running => "running",
        StatusDto::Completed => "completed",
        StatusDto::Failed => "failed",
        StatusDto::Cancelled => "cancelled",
        StatusDto::Rejected => "rejected",
    }
}

pub fn is_terminal(s: StatusDto) -> bool {
    matches!(
        s,
        StatusDto::Completed | StatusDto::Failed | StatusDto::Cancelled | StatusDto::Rejected
    )
}

pub fn plan(p: &PlanDto, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "plan: {}", p.summary)?;
    writeln!(
        out,
        "  planned by {} / {}{}; estimated cost ${:.4} (LLM ${:.4})",
        p.provider,
        p.model,
        if p.cached { " (cached)" } else { "" },
        p.estimated_cost_usd,
        p.llm_cost_usd
    )?;
    for k in &p.skipped {
        writeln!(
            out,
            "  skipped {} / {} ({}): {}",
            k.provider, k.model, k.code, k.reason
        )?;
    }
    for (i, s) in p.steps.iter().enumerate() {
        let reason = if s.reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", s.reason)
        };
        if s.provenance.is_empty() {
            let params = serde_json::to_string(&s.parameters).unwrap_or_default();
            writeln!(
                out,
                "  {}. {} {} on {}{reason}",
                i + 1,
                s.action,
                params,
                s.agent_type
            )?;
        } else {
            // One line per parameter, saying whether the request gave it or it is a default.
            writeln!(out, "  {}. {} on {}{reason}", i + 1, s.action, s.agent_type)?;
            for (k, v) in &s.parameters {
                let from = match s.provenance.get(k).map(String::as_str) {
                    Some("text") => "from the request",
                    Some("default") => "default, not in the request",
                    Some("inferred") => "chosen by the planner, not in the request",
                    _ => "",
                };
                writeln!(out, "       {k} = {v}  [{from}]")?;
            }
        }
        if let Some(pv) = &s.preview {
            match (pv.status.as_str(), &pv.error) {
                ("pending", _) => writeln!(out, "     dry run: running…")?,
                (_, Some(e)) => writeln!(
                    out,
                    "     dry run failed ({} {}): {}",
                    e.code, e.name, e.message
                )?,
                _ => {
                    let what = match pv.changed {
                        Some(true) => "would change:",
                        Some(false) => "would change nothing",
                        None => "done",
                    };
                    writeln!(out, "     dry run: {what}")?;
                    for line in pv.diff.as_deref().unwrap_or_default().lines() {
                        writeln!(out, "       {line}")?;
                    }
                }
            }
        }
    }
    for r in &p.risks {
        writeln!(out, "  risk: {r}")?;
    }
    Ok(())
}

pub fn request(r: &RequestDto, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "request {}  [{}]", r.id, status_str(r.status))?;
    writeln!(out, "  text: {}", r.text)?;
    writeln!(
        out,
        "  requester: {}{}{}",
        r.requester,
        if r.submitted_by != r.requester {
            format!(" (submitted by {})", r.submitted_by)
        } else {
            String::new()
        },
        if r.dry_run { "  (dry run)" } else { "" }
    )?;
    if let Some(a) = &r.approver {
        writeln!(
            out,
            "  approver: {a}{}",
            r.approval_comment
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "  created {}  updated {}",
        r.created_at.to_rfc3339(),
        r.updated_at.to_rfc3339()
    )?;
    if let Some(p) = &r.plan {
        plan(p, out)?;
    }
    if let Some(steps) = &r.steps {
        for s in steps {
            writeln!(
                out,
                "  step {} {}: {} ({}%){}",
                s.seq + 1,
                s.action,
                s.status,
                s.progress,
                s.changed
                    .map(|c| if c { ", changed" } else { ", unchanged" })
                    .unwrap_or("")
            )?;
            if let Some(e) = &s.error {
                writeln!(out, "    error {} {}: {}", e.code, e.name, e.message)?;
            }
            if let Some(d) = s.diff.as_deref().filter(|d| !d.trim().is_empty()) {
                writeln!(out, "    diff:")?;
                for line in d.lines() {
                    writeln!(out, "      {line}")?;
                }
            }
            if let Some(o) = s.output.as_deref().filter(|o| !o.trim().is_empty()) {
                if let Some(last) = o.lines().rev().find(|l| !l.trim().is_empty()) {
                    writeln!(out, "    last output: {last}")?;
                }
            }
        }
    }
    if let Some(w) = &r.waiting_reason {
        writeln!(out, "  waiting: {w}")?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "  error {} {}: {}", e.code, e.name, e.message)?;
    }
    if let Some(c) = &r.commit_id {
        writeln!(out, "  audit commit: {c}")?;
    }
    Ok(())
}

pub fn list(l: &RequestListDto, out: &mut impl Write) -> std::io::Result<()> {
    if l.requests.is_empty() {
        return writeln!(out, "no requests");
    }
    for r in &l.requests {
        let text = cut(&r.text, 60);
        writeln!(
            out,
            "{}  {:<17}  {}  {}",
            r.request_id,
            status_str(r.status),
            r.updated_at.format("%Y-%m-%d %H:%M:%S"),
            text
        )?;
    }
    Ok(())
}

/// `text` on one line, at most `max` characters; cut text ends with "…".
pub fn cut(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max {
        return flat.to_string();
    }
    let mut short: String = flat.chars().take(max.saturating_sub(1)).collect();
    short.truncate(short.trim_end().len());
    short.push('…');
    short
}

/// "4 s", "3 min", "2 h", "5 d".
pub fn age(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

pub fn logs(l: &LogsDto, out: &mut impl Write) -> std::io::Result<()> {
    for line in &l.lines {
        writeln!(
            out,
            "{} {:<6} {}",
            line.at.format("%H:%M:%S%.3f"),
            line.kind,
            line.message
        )?;
    }
    Ok(())
}

pub fn agents(a: &AgentsDto, out: &mut impl Write) -> std::io::Result<()> {
    if a.agents.is_empty() {
        writeln!(out, "no agents seen yet")?;
    }
    for ag in &a.agents {
        let seen = age(ag.heartbeat_age_secs);
        let liveness = match ag.liveness.as_str() {
            "fresh" => format!("fresh (heartbeat {seen} ago)"),
            "stale" => format!("STALE (heartbeat {seen} ago; missing heartbeats)"),
            "offline" => format!(
                "OFFLINE (heartbeat {seen} ago; no work is sent after {})",
                age(i64::try_from(ag.heartbeat_max_age_secs).unwrap_or(i64::MAX))
            ),
            other => format!("{other} (heartbeat {seen} ago)"),
        };
        writeln!(
            out,
            "{}  {}  on {}  {liveness}  running {}{}",
            ag.agent_id,
            ag.agent_type,
            ag.hostname,
            ag.running_tasks,
            ag.max_tasks.map(|m| format!("/{m}")).unwrap_or_default()
        )?;
    }
    for r in &a.rejected {
        writeln!(
            out,
            "rejected: {} (broker user {}) {} x{}, last {}: {} {}",
            r.agent_id.as_deref().unwrap_or("unknown agent"),
            r.publisher.as_deref().unwrap_or("none"),
            r.message_type.as_deref().unwrap_or("message"),
            r.count,
            r.last_at.to_rfc3339(),
            r.code,
            r.reason
        )?;
    }
    Ok(())
}

/// The catalog: one block per action, one line per parameter.
pub fn actions(c: &Catalog, out: &mut impl Write) -> std::io::Result<()> {
    if c.actions.is_empty() {
        return writeln!(out, "no actions in {}", c.root.display());
    }
    for a in c.actions.values() {
        let mut traits = vec![format!("agent {}", a.agent_type)];
        if a.check_mode {
            traits.push("check mode".into());
        }
        if a.auto_approve {
            traits.push("may be auto-approved".into());
        }
        if a.resources.gpu {
            traits.push("needs a GPU".into());
        }
        writeln!(out, "{}  ({})", a.name, traits.join(", "))?;
        writeln!(out, "    {}", a.description)?;
        for (name, p) in &a.parameters {
            let mut facts = vec![match p.kind {
                ParamType::String => "string",
                ParamType::Integer => "integer",
                ParamType::Boolean => "boolean",
            }
            .to_string()];
            facts.push(if p.required { "required" } else { "optional" }.into());
            if let Some(d) = &p.default {
                facts.push(format!("default {d}"));
            }
            if let Some(pat) = &p.pattern {
                facts.push(format!("pattern {pat}"));
            }
            match (p.min, p.max) {
                (Some(lo), Some(hi)) => facts.push(format!("{lo} to {hi}")),
                (Some(lo), None) => facts.push(format!("at least {lo}")),
                (None, Some(hi)) => facts.push(format!("at most {hi}")),
                (None, None) => {}
            }
            if let Some(m) = p.max_length {
                facts.push(format!("at most {m} bytes"));
            }
            write!(out, "    {name}: {}", facts.join(", "))?;
            if let Some(d) = &p.description {
                write!(out, "  ({d})")?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

pub fn costs(c: &CostsDto, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "LLM spend {}: ${:.4}", c.month, c.total_spent_usd)?;
    for p in &c.providers {
        let budget = match p.budget_usd {
            Some(b) => format!("of ${b:.2} (${:.4} left)", p.remaining_usd.unwrap_or(0.0)),
            None => "no budget".into(),
        };
        writeln!(
            out,
            "  {:<10} ${:.4} {budget}; {} calls, {} in / {} out tokens",
            p.provider, p.spent_usd, p.calls, p.input_tokens, p.output_tokens
        )?;
    }
    Ok(())
}

/// Shows live events: an indicatif bar (step and last output line) on a terminal, one plain
/// line per event otherwise. Everything goes to stderr when stdout is reserved for JSON.
pub struct Progress {
    bar: Option<ProgressBar>,
    steps: Vec<String>,
    to_stderr: bool,
    quiet: bool,
}

impl Progress {
    /// `steps`: the plan's actions, to name steps. `json`: stdout carries JSON only.
    pub fn new(steps: Vec<String>, json: bool) -> Progress {
        let tty = if json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        };
        let bar = tty.then(|| {
            let bar = ProgressBar::new(100);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos:>3}% {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            steps,
            to_stderr: json,
            quiet: json && !std::io::stderr().is_terminal(),
        }
    }

    pub fn set_steps(&mut self, steps: Vec<String>) {
        self.steps = steps;
    }

    fn step_name(&self, seq: u32) -> String {
        let total = self.steps.len();
        match self.steps.get(seq as usize) {
            Some(a) => format!("step {}/{total} {a}", seq + 1),
            None => format!("step {}", seq + 1),
        }
    }

    fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.to_stderr => eprintln!("{text}"),
            None => println!("{text}"),
        }
    }

    pub fn event(&mut self, ev: &EventDto) {
        match ev {
            EventDto::Status { status, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_prefix(status_str(*status));
                }
                self.line(format!("status: {}", status_str(*status)));
            }
            EventDto::Step { seq, status, .. } => {
                let name = self.step_name(*seq);
                if let Some(bar) = &self.bar {
                    bar.set_prefix(name.clone());
                    if status == "dispatched" || status == "running" {
                        bar.set_position(0);
                    }
                    if status == "completed" {
                        bar.set_position(100);
                    }
                }
                self.line(format!("{name}: {status}"));
            }
            EventDto::Progress {
                seq,
                progress,
                message,
                ..
            } => match &self.bar {
                Some(bar) => {
                    bar.set_prefix(self.step_name(*seq));
                    bar.set_position(u64::from((*progress).min(100)));
                    if !message.is_empty() {
                        bar.set_message(message.clone());
                    }
                }
                None => self.line(format!("{} {progress}%: {message}", self.step_name(*seq))),
            },
            EventDto::Output { seq, line, .. } => match &self.bar {
                Some(bar) => bar.set_message(line.clone()),
                None => self.line(format!("{} | {line}", self.step_name(*seq))),
            },
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_lists_rejected_senders() {
        let a: AgentsDto = serde_json::from_value(serde_json::json!({
            "agents": [],
            "rejected": [{
                "agent_id": "python-h", "publisher": "chiffon-agent-python",
                "message_type": "heartbeat", "code": 5004, "field": "payload.memory.total_gb",
                "reason": "invalid field `payload.memory.total_gb`: missing field `total_gb`",
                "first_at": "2026-12-01T08:00:00Z", "last_at": "2026-12-01T08:01:00Z", "count": 31
            }]
        }))
        .unwrap();
        let mut out = Vec::new();
        agents(&a, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("no agents seen yet\n"), "{text}");
        assert!(
            text.contains("rejected: python-h (broker user chiffon-agent-python) heartbeat x31")
                && text.contains("5004 invalid field `payload.memory.total_gb`"),
            "{text}"
        );
        // An older server without the list still renders.
        let old: AgentsDto = serde_json::from_value(serde_json::json!({ "agents": [] })).unwrap();
        assert!(old.rejected.is_empty());
    }

    #[test]
    fn cut_text_ends_with_an_ellipsis() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("exactly10!", 10), "exactly10!");
        assert_eq!(cut("one two three four", 10), "one two t…");
        assert_eq!(cut("one two   three", 10), "one two…");
        assert_eq!(cut("line\nbreak", 20), "line break");
        assert_eq!(cut("ééééééééééé", 5), "éééé…");
    }

    #[test]
    fn ages() {
        assert_eq!(age(-1), "0 s");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(600), "10 min");
        assert_eq!(age(7200), "2 h");
        assert_eq!(age(3 * 86_400), "3 d");
    }
}
