"""The fault campaign's think-API subset in `make test`: the real server SIGKILLed twice under 16 concurrent
clients (every 200 audited, the chain intact, no thinking anywhere), and a bounded, derandomized schemathesis fuzz
of its own OpenAPI schema (no 500, no traceback, no thinking). A campaign script runs the same jobs with more."""

from __future__ import annotations

import json

import fault_api
import pytest

pytestmark = pytest.mark.slow
KILLS = 2
CLIENTS = 16
EXAMPLES = 30


def test_killed_api_under_load_audits_every_answer(tmp_path):
    t = fault_api.kill_api_under_load(tmp_path, kills=KILLS, clients=CLIENTS, load_s=4.0)
    print(json.dumps(t.as_dict(), ensure_ascii=False, indent=1))
    t.assert_clean()
    f = t.figures
    assert f["restarts"] == KILLS and f["unaudited"] == 0
    assert all(f["answered_by_kind"][k] > 0 for k in ("think", "chat", "stream")), f
    assert f["rows"] >= f["answered_200"] > 0


def test_fuzzed_api_never_500s_tracebacks_or_leaks_thinking(tmp_path):
    t = fault_api.fuzz_api(tmp_path, max_examples=EXAMPLES)
    print(json.dumps(t.as_dict(), ensure_ascii=False, indent=1))
    t.assert_clean()
    assert t.figures["cases"] > 0
    assert any(k.startswith("POST /think") for k in t.figures["cases_per_operation"])
    assert any(k.startswith("POST /v1/chat/completions") for k in t.figures["cases_per_operation"])
