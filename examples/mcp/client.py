"""An MCP client of Chiffon, on the official Python MCP SDK (PyPI `mcp`, pinned in setup.sh).

It connects to Chiffon's MCP server over streamable HTTP (`/mcp` on a running server) or
over stdio (`chiffon mcp`, which calls the server's HTTP API), lists the tools, reads the
catalog, submits a request, follows it until it is planned, lists requests and cancels it.
No tool approves: a person does, in the console or with `chiffon approve`.

Run (a server on 127.0.0.1:8080, e.g. `chiffon up`; examples/mcp/setup.sh makes the venv):

    .venv-mcp/bin/python examples/mcp/client.py --transport http --server http://127.0.0.1:8080
    .venv-mcp/bin/python examples/mcp/client.py --transport stdio --chiffon target/debug/chiffon

Add `--token TOKEN` when the server has API tokens. Expected output (ids and counts vary):

    tools: cancel_request, get_request, list_actions, list_requests, submit_request
    list_actions: 7 actions (deploy_kuma, ensure_directory, ...)
    submit_request: 0199f0c2-... planning http://127.0.0.1:8080/ui/request/0199f0c2-...
    get_request: awaiting_approval, plan by offline: ensure_directory {"path": "/tmp/chiffon/mcp", ...}
    list_requests: 1 awaiting_approval
    cancel_request: cancelled
    get_request (unknown id): tool error 5102 not_found: ...

`--check` turns the walk-through into assertions (examples/mcp/run.sh, in CI); `--role viewer`
expects the submission to be refused with 5504 and stops there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOOLS = {"list_actions", "submit_request", "get_request", "list_requests", "cancel_request"}


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"CHECK FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def error_of(result) -> tuple[int, str]:
    err = (result.structured_content or {}).get("error", {})
    return err.get("code", 0), err.get("message", "")


async def walk(client: Client, args: argparse.Namespace) -> None:
    tools = await client.list_tools()
    names = sorted(t.name for t in tools.tools)
    print("tools:", ", ".join(names))
    check(set(names) == TOOLS, f"the five tools, no approval tool: {names}")

    actions = await client.call_tool("list_actions", {})
    check(not actions.is_error, f"list_actions: {actions.content}")
    listed = actions.structured_content["actions"]
    print(f"list_actions: {len(listed)} actions ({', '.join(a['name'] for a in listed[:2])}, ...)")
    check(any(a["name"] == "ensure_directory" for a in listed), "ensure_directory in the catalog")
    check(all(a["parameters"]["type"] == "object" for a in listed), "parameters as JSON Schema")

    submitted = await client.call_tool("submit_request", {"text": args.text, "dry_run": args.dry_run})
    if args.role == "viewer":
        code, message = error_of(submitted)
        print(f"submit_request as a viewer: tool error {code}: {message}")
        check(submitted.is_error and code == 5504, "a viewer may not submit (5504)")
        listed = await client.call_tool("list_requests", {"limit": 5})
        check(not listed.is_error, "a viewer may list requests")
        print(f"list_requests: {len(listed.structured_content['requests'])} requests")
        return
    check(not submitted.is_error, f"submit_request: {submitted.content}")
    s = submitted.structured_content
    request_id = s["request_id"]
    print(f"submit_request: {request_id} {s['status']} {s['console_url']}")
    check(s["console_url"].endswith(f"/ui/request/{request_id}"), "the console URL")

    view = {}
    for _ in range(200):
        got = await client.call_tool("get_request", {"request_id": request_id})
        check(not got.is_error, f"get_request: {got.content}")
        view = got.structured_content
        if view["status"] != "planning":
            break
        await asyncio.sleep(0.1)
    plan = view.get("plan") or {}
    steps = plan.get("steps") or []
    first = steps[0] if steps else {}
    print(
        f"get_request: {view['status']}, plan by {plan.get('provider')}: "
        f"{first.get('action')} {json.dumps(first.get('parameters', {}))}"
    )
    check(view["status"] == "awaiting_approval", f"planned and waiting for a person: {view['status']}")

    listed = await client.call_tool("list_requests", {"status": "awaiting_approval", "limit": 5})
    check(not listed.is_error, f"list_requests: {listed.content}")
    requests = listed.structured_content["requests"]
    print(f"list_requests: {len(requests)} awaiting_approval")
    check(any(r["id"] == request_id for r in requests), "the request is listed")

    cancelled = await client.call_tool("cancel_request", {"request_id": request_id})
    check(not cancelled.is_error, f"cancel_request: {cancelled.content}")
    print(f"cancel_request: {cancelled.structured_content['status']}")
    check(cancelled.structured_content["status"] == "cancelled", "cancelled")

    missing = await client.call_tool("get_request", {"request_id": str(uuid.uuid4())})
    code, message = error_of(missing)
    print(f"get_request (unknown id): tool error {code} not_found: {message}")
    check(missing.is_error and code == 5102, "an unknown request is a 5102 tool error")

    bad = await client.call_tool("list_requests", {"status": "sleeping"})
    check(bad.is_error and error_of(bad)[0] == 5501, "a bad status is a 5501 tool error")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=["http", "stdio"], default="http")
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the Chiffon server")
    p.add_argument("--token", default=None, help="API token (role requester or above)")
    p.add_argument("--chiffon", default="chiffon", help="the chiffon binary (stdio)")
    p.add_argument("--text", default="Ensure the directory /tmp/chiffon/mcp exists")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--role", choices=["requester", "viewer"], default="requester")
    p.add_argument("--check", action="store_true", help="exit non-zero when a check fails")
    args = p.parse_args()
    if not args.check:
        global check

        def check(cond: bool, what: str) -> None:  # noqa: F811 - printing only
            if not cond:
                print(f"(unexpected: {what})", file=sys.stderr)

    if args.transport == "http":
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        async with create_mcp_http_client(headers=headers) as http:
            transport = streamable_http_client(f"{args.server.rstrip('/')}/mcp", http_client=http)
            async with Client(transport) as client:
                await walk(client, args)
    else:
        cmd = [args.chiffon, "--server", args.server]
        if args.token:
            cmd += ["--token", args.token]
        params = StdioServerParameters(command=cmd[0], args=cmd[1:] + ["mcp"])
        async with Client(params) as client:
            await walk(client, args)


if __name__ == "__main__":
    asyncio.run(main())
