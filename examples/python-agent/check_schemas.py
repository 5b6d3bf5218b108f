#!/usr/bin/env python3
"""Checks the JSON Schemas of chiffon-protocol/schema/ from outside Rust.

Every message example in PROTOCOL.md validates against `envelope.schema.json`, and so do the
messages agent.py builds; messages PROTOCOL.md says are refused do not. Run by run-test.sh:

    .venv/bin/python check_schemas.py      # prints "schemas: N examples valid, M refused"
"""

import copy
import json
import pathlib
import re
import sys

import jsonschema

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import agent  # noqa: E402

schema = json.loads((ROOT / "chiffon-protocol/schema/envelope.schema.json").read_text())
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
for name in ("work_request", "work_status", "work_result", "error", "user_request", "heartbeat", "cancel"):
    jsonschema.Draft202012Validator.check_schema(
        json.loads((ROOT / f"chiffon-protocol/schema/{name}.schema.json").read_text()))


def errors(doc):
    return [e.message for e in validator.iter_errors(doc)]


examples = []
for block in re.findall(r"```json\n(.*?)```", (ROOT / "PROTOCOL.md").read_text(), re.S):
    doc = json.loads(block)
    if "message_type" in doc:
        examples.append(doc)
        assert not errors(doc), (errors(doc), doc)
types = {d["message_type"] for d in examples}
assert len(types) == 7, types

# What agent.py sends.
hb = agent.envelope("heartbeat", {"agent_id": "a", "agent_type": "python", "hostname": "h",
                                  "cpu": agent.cpu(), "memory": agent.memory()})
assert not errors(hb), errors(hb)

by_type = {d["message_type"]: d for d in examples}
refused = []
def refuse(change, why):
    doc = copy.deepcopy(by_type[change[0]])
    change[1](doc)
    assert errors(doc), f"schema accepted {why}: {doc}"
    refused.append(why)

refuse(("work_status", lambda d: d["payload"].update(progress=101)), "progress 101")
refuse(("work_result", lambda d: d["payload"].pop("attempt")), "a result without attempt")
refuse(("work_result", lambda d: d["payload"].update(attempt=0)), "attempt 0")
refuse(("heartbeat", lambda d: d["payload"].update(memory={"total_gb": 8})), "memory without a usage figure")
refuse(("heartbeat", lambda d: d["payload"].pop("agent_id")), "a heartbeat without agent_id")
refuse(("user_request", lambda d: d["payload"].update(text="")), "an empty text")
refuse(("work_request", lambda d: d.update(version=2)), "version 2")
refuse(("error", lambda d: d["payload"].update(code=4000)), "an unknown error code")
print(f"schemas: {len(examples)} PROTOCOL.md examples and the agent's heartbeat valid; refused: {', '.join(refused)}")
