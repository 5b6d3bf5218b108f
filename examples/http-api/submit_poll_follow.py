#!/usr/bin/env python3
"""Calling Chiffon's HTTP API with the Python standard library only: submit a request,
poll until it is planned, approve it, and follow its live events (Server-Sent Events).

Run against a server (`chiffon up &`, or production):

    CHIFFON_URL=http://127.0.0.1:8080 python3 examples/http-api/submit_poll_follow.py ["request text"]

Set CHIFFON_TOKEN when the server has API tokens. The server answers only Host names on
its allow-list (loopback names, its bind address, `server.allowed_hosts`) and refuses
cross-site browser requests, so talk to it by the name it knows (127.0.0.1 here). Every
error body is `{"error": {"code": 5xxx, "message", "details", "trace_id"}}`.

Expected output (ids differ):

    POST /request -> 202 0193...: planning
    GET /request/0193... -> awaiting_approval: Do nothing and succeed at once ... (noop ...)
    POST /approve -> queued
    event status: queued
    event status: running
    event step: #0 dispatched
    event step: #0 running
    event step: #0 completed
    event status: completed
    completed: noop -> noop; audit commit 70f1...
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

BASE = os.environ.get("CHIFFON_URL", "http://127.0.0.1:8080").rstrip("/")
TOKEN = os.environ.get("CHIFFON_TOKEN")


def call(method, path, body=None, accept="application/json"):
    """One request; returns the response object (the caller reads it)."""
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as e:
        err = json.load(e).get("error", {})
        sys.exit(f"{method} {path} -> {e.code} {err.get('code')}: {err.get('message')} (trace {err.get('trace_id')})")


def json_call(method, path, body=None):
    with call(method, path, body) as r:
        return r.status, json.load(r)


def events(path):
    """Yields (event name, data as JSON) from a text/event-stream until the server ends it."""
    with call("GET", path, accept="text/event-stream") as r:
        name, data = "message", []
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    yield name, json.loads("\n".join(data))
                name, data = "message", []
            elif line.startswith(":"):
                continue  # keep-alive comment
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())


def main():
    text = sys.argv[1] if len(sys.argv) > 1 else "Ping"
    status, accepted = json_call("POST", "/request", {"text": text})
    rid = accepted["request_id"]
    print(f"POST /request -> {status} {rid}: {accepted['status']}")

    request = {"status": "planning"}
    for _ in range(150):
        _, request = json_call("GET", f"/request/{rid}")
        if request["status"] != "planning":
            break
        time.sleep(0.2)
    if request["status"] != "awaiting_approval":
        sys.exit(f"request {rid} is {request['status']}: {request.get('error')}")
    print(f"GET /request/{rid} -> awaiting_approval: {request['plan']['summary']}")

    _, decided = json_call("POST", "/approve", {"request_id": rid, "approved": True, "comment": "approved by a script"})
    print(f"POST /approve -> {decided.get('status')}")

    for name, data in events(f"/request/{rid}/events"):
        if name == "status":
            print(f"event status: {data['status']}")
        elif name == "step":
            print(f"event step: #{data['seq']} {data['status']}")
        elif name == "output":
            print(f"event output: #{data['seq']} {data['line']}")
        # `progress` events are frequent; a UI would draw a bar from data["progress"].

    _, final = json_call("GET", f"/request/{rid}")
    steps = ", ".join(f"{s['action']} -> {s.get('output') or ''}" for s in final.get("steps") or [])
    print(f"{final['status']}: {steps}; audit commit {final.get('commit_id')}")
    sys.exit(0 if final["status"] == "completed" else 1)


if __name__ == "__main__":
    main()
