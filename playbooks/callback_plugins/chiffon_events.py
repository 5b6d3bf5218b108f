# Chiffon's event callback: one machine-readable line per play/task event, beside the normal
# human output. The infrastructure agent enables it with ANSIBLE_CALLBACK_PLUGINS pointing
# here and ANSIBLE_CALLBACKS_ENABLED=chiffon_events, and reads lines that start with
# "CHIFFON_EVENT " to compute progress (tasks finished / tasks in the play), `changed`
# (from the recap) and the check-mode diff. It is a notification callback rather than the
# stdout callback so the default human-readable output keeps streaming unchanged, and it
# needs nothing beyond ansible-core (the `json` stdout callback lives in ansible.posix).
from __future__ import annotations

import json

from ansible.playbook.block import Block
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: chiffon_events
    type: notification
    short_description: one JSON line per task event for the Chiffon agent
    description: prints lines "CHIFFON_EVENT {json}" on stdout
    requirements: []
"""

PREFIX = "CHIFFON_EVENT "


def _count_tasks(blocks):
    n = 0
    for b in blocks:
        if isinstance(b, Block):
            n += _count_tasks(b.block)
        elif getattr(b, "action", None) not in ("meta", "ansible.builtin.meta"):
            n += 1
    return n


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "chiffon_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._done = 0

    def _emit(self, event, **fields):
        fields["event"] = event
        self._display.display(PREFIX + json.dumps(fields, default=str, sort_keys=True))

    def v2_playbook_on_play_start(self, play):
        try:
            total = _count_tasks(play.compile())
        except Exception:  # counting is best effort; progress then stays coarse
            total = 0
        self._emit("play_start", name=play.get_name(), tasks=total)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._emit("task_start", name=task.get_name())

    def _result(self, status, result):
        self._emit(
            "task_result",
            status=status,
            host=result._host.get_name(),
            task=result._task.get_name(),
            changed=bool(result._result.get("changed", False)),
            msg=result._result.get("msg", ""),
        )

    def v2_runner_on_ok(self, result):
        self._result("changed" if result._result.get("changed") else "ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result("ignored" if ignore_errors else "failed", result)

    def v2_runner_on_skipped(self, result):
        self._result("skipped", result)

    def v2_runner_on_unreachable(self, result):
        self._result("unreachable", result)

    def v2_on_file_diff(self, result):
        diff = result._result.get("diff")
        text = self._get_diff(diff) if diff else ""
        if text.strip():
            self._emit(
                "diff",
                host=result._host.get_name(),
                task=result._task.get_name(),
                diff=text,
            )

    def v2_playbook_on_stats(self, stats):
        hosts = {}
        for h in sorted(stats.processed.keys()):
            hosts[h] = stats.summarize(h)
        self._emit("stats", hosts=hosts)
