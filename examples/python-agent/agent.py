#!/usr/bin/env python3
"""A Chiffon agent in Python, written from PROTOCOL.md alone (no Chiffon code).

What: consumes `agent.python`, heartbeats to `orchestrator.results` (memory given as
`{total_gb, available_gb, used_percent}`, as a Python agent naturally would), and answers
the `python_echo` action: `work_status` (accepted, running) then a `work_result` echoing
the `message` parameter. Every publish carries `user_id` (the broker user it connected
as) and waits for the broker's confirm; a `work_request` is acked only after its result is
confirmed, and runs only if its publisher is an orchestrator user.

Run (see README.md beside this file):

    ./setup.sh                                  # a venv with pika, pinned
    CHIFFON_AMQP_URL=amqp://chiffon-agent-python:PASS@127.0.0.1:5672/chiffon \
    CHIFFON_ORCHESTRATOR_USERS=chiffon-orchestrator .venv/bin/python agent.py

You will see one log line per heartbeat sent at start, then one per step:
`python-agent: task 3f2c... python_echo attempt 1: completed`.
"""

import json
import os
import signal
import socket
import sys
import time
import uuid
from datetime import datetime, timezone

import pika

AGENT_TYPE = "python"
ACTIONS = {"python_echo"}
WORK_EXCHANGE = "chiffon.work"
CONTROL_EXCHANGE = "chiffon.control"
DEAD_LETTER_QUEUE = "chiffon.dead"
RESULTS_QUEUE = "orchestrator.results"
QUEUE = f"agent.{AGENT_TYPE}"
# PROTOCOL.md, "The broker": work queues carry exactly these arguments.
QUEUE_ARGUMENTS = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": DEAD_LETTER_QUEUE}
GIB = 1024 ** 3


def log(*args):
    print("python-agent:", *args, file=sys.stderr, flush=True)


def now():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def no_nul(text):
    """PROTOCOL.md: a NUL character anywhere is refused; never send one."""
    return str(text).replace("\x00", "")


def envelope(message_type, payload, trace_id="heartbeat", request_id=None):
    return {
        "message_id": str(uuid.uuid4()),
        "trace_id": trace_id,
        "request_id": request_id,
        "message_type": message_type,
        "timestamp": now(),
        "version": 1,
        "payload": payload,
    }


def memory():
    """`{total_gb, available_gb, used_percent}` from /proc/meminfo, or None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:]}
        total = kib["MemTotal"] * 1024 / GIB
        available = kib["MemAvailable"] * 1024 / GIB
    except (OSError, KeyError, ValueError):
        return None
    return {
        "total_gb": round(total, 3),
        "available_gb": round(available, 3),
        "used_percent": round(100 * (1 - available / total), 1) if total else 0.0,
    }


def cpu():
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return {"percent": 0.0, "cores": cores}
    return {"percent": round(min(100.0, 100 * load / cores), 1), "cores": cores, "load_1m": load}


class Agent:
    def __init__(self, url, orchestrator_users, heartbeat_seconds):
        self.params = pika.URLParameters(url)
        # PROTOCOL.md, "Identities": user_id must be the user we connect as.
        self.user = self.params.credentials.username
        self.orchestrators = orchestrator_users
        self.heartbeat_seconds = heartbeat_seconds
        self.hostname = socket.gethostname()
        self.agent_id = os.environ.get("CHIFFON_AGENT_ID", f"python-{self.hostname}")
        self.running = 0
        self.stopping = False

    # -- broker --------------------------------------------------------------------------

    def connect(self):
        self.connection = pika.BlockingConnection(self.params)
        ch = self.connection.channel()
        ch.confirm_delivery()  # basic_publish now waits for the broker's confirm
        ch.exchange_declare(WORK_EXCHANGE, "direct", durable=True)
        ch.queue_declare(DEAD_LETTER_QUEUE, durable=True)
        ch.queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
        ch.queue_bind(QUEUE, WORK_EXCHANGE, routing_key=QUEUE)
        ch.exchange_declare(CONTROL_EXCHANGE, "fanout", durable=True)
        control = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(control, CONTROL_EXCHANGE)
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(QUEUE, self.on_work)
        ch.basic_consume(control, self.on_control, auto_ack=True)
        self.channel = ch
        log(f"connected as broker user {self.user}; consuming {QUEUE} as {self.agent_id}")

    def publish(self, env):
        """To `orchestrator.results` through `chiffon.work`, with user_id; waits for the confirm."""
        body = json.dumps(env, allow_nan=False).encode()
        self.channel.basic_publish(
            WORK_EXCHANGE,
            RESULTS_QUEUE,
            body,
            pika.BasicProperties(
                user_id=self.user,
                delivery_mode=2,
                content_type="application/json",
                message_id=env["message_id"],
                type=env["message_type"],
            ),
            mandatory=True,
        )

    # -- heartbeats ----------------------------------------------------------------------

    def heartbeat(self):
        payload = {
            "agent_id": self.agent_id,
            "agent_type": AGENT_TYPE,
            "hostname": self.hostname,
            "cpu": cpu(),
            "gpus": [],
            "running_tasks": self.running,
            "max_tasks": 1,
            "actions": sorted(ACTIONS),
        }
        mem = memory()
        if mem is not None:  # unknown memory is allowed: we then get only steps needing none
            payload["memory"] = mem
        try:
            self.publish(envelope("heartbeat", payload))
        except pika.exceptions.UnroutableError:
            log(f"{RESULTS_QUEUE} does not exist yet (is chiffon-server running?)")

    # -- work ----------------------------------------------------------------------------

    def on_work(self, ch, method, props, body):
        try:
            env = json.loads(body)
        except ValueError:
            env = None
        if not isinstance(env, dict):
            return self.refuse(method, None, 5001, "work_request is not a JSON object")
        if props.user_id is None or (self.orchestrators and props.user_id not in self.orchestrators):
            return self.refuse(method, env, 5009, f"work_request from broker user {props.user_id!r}, not the orchestrator: not run")
        if env.get("version") != 1:
            return self.refuse(method, env, 5002, f"unsupported version {env.get('version')!r}")
        if env.get("message_type") != "work_request" or not isinstance(env.get("payload"), dict):
            return self.refuse(method, env, 5004, "agent queues take work_request messages")
        work = env["payload"]
        task_id, attempt = work.get("task_id"), work.get("attempt", 1)
        if not isinstance(task_id, str) or not isinstance(attempt, int) or attempt < 1:
            return self.refuse(method, env, 5004, "work_request needs task_id and an attempt of 1 or more")
        ids = {"trace_id": env.get("trace_id") or "python-agent", "request_id": env.get("request_id")}

        def status(state, progress, message, lines=()):
            self.publish(envelope("work_status", {
                "task_id": task_id, "status": state, "progress": progress,
                "message": no_nul(message), "lines": [no_nul(l) for l in lines],
                "agent_id": self.agent_id, "attempt": attempt,
            }, **ids))

        started = time.monotonic()
        self.running += 1
        try:
            status("accepted", 0, "accepted")
            outcome, output, error = self.run(work, status)
        finally:
            self.running -= 1
        result = {
            "task_id": task_id,
            "status": outcome,
            "attempt": attempt,  # required: which attempt this answers
            "output": no_nul(output),
            "duration_seconds": round(time.monotonic() - started, 6),
            "resource_usage": {"cpu_hours": 0.0, "memory_peak_gb": 0.0},
            "changed": False,
            "agent_id": self.agent_id,
        }
        if error:
            result["error"] = error
        self.publish(envelope("work_result", result, **ids))  # confirmed by the broker...
        ch.basic_ack(method.delivery_tag)  # ...before the request is acked
        log(f"task {task_id} {work.get('action')} attempt {attempt}: {outcome}")

    def run(self, work, status):
        """Runs one step: (status, output, error payload or None)."""
        action = work.get("action")
        if action not in ACTIONS:
            return "failed", "", {"code": 5404, "message": f"action {action!r} is not handled here", "details": {"action": action}}
        params = work.get("parameters") or {}
        message = params.get("message", "hello from python")
        # PROTOCOL.md: parameters were validated by the orchestrator; validate them again.
        if not isinstance(message, str) or len(message) > 200 or any(m in message for m in ("\x00", "{{", "{%", "{#")):
            return "failed", "", {"code": 5407, "message": "parameter `message` is invalid", "details": {"parameter": "message"}}
        if work.get("dry_run"):
            status("running", 100, "dry run: would echo", [message])
            return "completed", f"would echo: {message}", None
        status("running", 50, "echoing", [message])
        return "completed", message, None

    def refuse(self, method, env, code, message):
        """PROTOCOL.md: publish an `error`, nack without requeue (to chiffon.dead)."""
        log(f"refusing a message: {code} {message}")
        ids = {}
        if isinstance(env, dict):
            ids = {"trace_id": str(env.get("trace_id") or "python-agent"), "request_id": env.get("request_id") if isinstance(env.get("request_id"), str) else None}
        self.publish(envelope("error", {"code": code, "message": no_nul(message), "details": {}}, **ids))
        self.channel.basic_nack(method.delivery_tag, requeue=False)

    def on_control(self, ch, method, props, body):
        # Steps finish at once here, so a cancel never finds one running; a longer-running
        # agent would stop the task and publish a `cancelled` result (error 5406).
        try:
            task = json.loads(body).get("payload", {}).get("task_id")
        except (ValueError, AttributeError):
            return
        log(f"cancel for task {task}: nothing running")

    # -- main loop -----------------------------------------------------------------------

    def serve(self):
        self.connect()
        next_beat = 0.0
        while not self.stopping:
            if time.monotonic() >= next_beat:
                self.heartbeat()
                next_beat = time.monotonic() + self.heartbeat_seconds
            self.connection.process_data_events(time_limit=0.5)
        self.connection.close()


def main():
    url = os.environ.get("CHIFFON_AMQP_URL")
    if not url:
        sys.exit("python-agent: set CHIFFON_AMQP_URL=amqp://USER:PASS@HOST:5672/chiffon")
    orchestrators = [u for u in os.environ.get("CHIFFON_ORCHESTRATOR_USERS", "").split(",") if u]
    agent = Agent(url, orchestrators, float(os.environ.get("CHIFFON_HEARTBEAT_SECONDS", "2")))

    def stop(*_):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not agent.stopping:
        try:
            agent.serve()
        except pika.exceptions.AMQPConnectionError as e:
            log(f"broker connection lost ({e!r}); reconnecting in 2 s")
            time.sleep(2)


if __name__ == "__main__":
    main()
