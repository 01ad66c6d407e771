"""The `openai` backend (any OpenAI-compatible engine's /v1/completions) against a stand-in with vLLM's shapes
(tests/engine_standin.py, NOT A MODEL): our prompt, stop tokens and sampling reach the engine, whole and streamed
replies agree, every misbehaviour is a clear backend_* error, and the whole leak corpus goes through `so8t serve`'s
app with the official openai client without one leak."""

from __future__ import annotations

import contextlib

import httpx
import openai
import pytest
from engine_standin import EngineStandIn
from test_leak import CASES, MARKER_RE, leaked

from services.think_api.backends.openai import OpenAICompatBackend
from services.think_api.backends.protocol import BackendError, Generation, GenRequest
from shared.think_format import STOP_TOKENS

REPLY = "# 思考ステップ\nSECRET-THINKING 足し算。\n判定: ALLOW\n\n# 最終回答\n答えは 4 です。"
REQ = GenRequest("<|user|>\n2+2は？<|end|>\n<|assistant|>\n", 64, 0.2, 0.8, 7)


@pytest.fixture
def engine():
    e = EngineStandIn(lambda prompt: REPLY)
    yield e
    e.close()


def test_prompt_stops_and_sampling_reach_the_engine_whole_and_streamed(engine):
    b = OpenAICompatBackend(engine.url, "tiny")
    whole = b.generate(REQ)
    items = list(b.stream(REQ))
    assert whole == Generation(REPLY, 11, len(REPLY), "stop")
    assert "".join(i for i in items if isinstance(i, str)) == REPLY and items[-1] == whole
    for body in engine.requests:
        assert body["prompt"] == REQ.prompt and body["stop"] == list(STOP_TOKENS) and body["model"] == "tiny"
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (64, 0.2, 0.8, 7)
    assert engine.requests[1]["stream"] is True and engine.requests[1]["stream_options"] == {"include_usage": True}
    assert b.health()[0]
    assert not OpenAICompatBackend(engine.url, "other").health()[0]
    b.close()


@pytest.mark.parametrize(
    "mode,code,status",
    [
        ("not_found", "backend_model_not_found", 503),
        ("context", "prompt_too_long", 400),
        ("overloaded", "backend_busy", 503),
        ("bad_json", "backend_bad_response", 502),
        ("slow", "backend_timeout", 504),
    ],
)
def test_engine_errors_are_clear_backend_errors(engine, mode, code, status):
    engine.mode = mode
    b = OpenAICompatBackend(engine.url, "tiny", timeout=1.0)
    for call in (b.generate, lambda r: list(b.stream(r))):
        with pytest.raises(BackendError) as err:
            call(REQ)
        assert (err.value.code, err.value.http_status) == (code, status)
        assert "illegal" not in err.value.message and "9000" not in err.value.message  # the engine's text stays out


@pytest.mark.parametrize("mode,code", [("error_mid_stream", "backend_error"), ("no_done", "backend_bad_response")])
def test_a_stream_failing_midway_is_an_error_after_its_text(engine, mode, code):
    engine.mode = mode
    got: list = []
    with pytest.raises(BackendError) as err:
        for item in OpenAICompatBackend(engine.url, "tiny").stream(REQ):
            got.append(item)
    assert err.value.code == code and not any(isinstance(i, Generation) for i in got)


def test_no_engine_is_backend_unavailable():
    b = OpenAICompatBackend("http://127.0.0.1:9/v1", "tiny", timeout=2)
    with pytest.raises(BackendError) as err:
        b.generate(REQ)
    assert (err.value.code, err.value.http_status) == ("backend_unavailable", 503)
    ok, detail = b.health()
    assert not ok and "no engine" in detail


@pytest.fixture(scope="module")
def leak_api(tmp_path_factory):
    """The API (uvicorn in a thread) on the openai backend, the stand-in replying with the corpus' case i."""
    from services.think_api.app import ServeSettings, create_app, serve_background
    from services.think_api.audit import AuditLog

    replies = {f"case {i}<|end|>": out for i, (_, _, out) in enumerate(CASES)}

    def reply(prompt: str) -> str:
        key = prompt[prompt.rindex("case ") :].split("\n")[0]
        return replies[key]

    engine = EngineStandIn(reply, piece_chars=5)
    backend = OpenAICompatBackend(engine.url, "tiny")
    audit = AuditLog(tmp_path_factory.mktemp("leak-openai") / "audit.sqlite3")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serve_background(create_app(backend, audit, ServeSettings(parallel=8))))
        stack.callback(engine.close)
        yield url


def test_the_whole_leak_corpus_through_the_openai_backend_with_the_openai_client(leak_api):
    client = openai.OpenAI(base_url=f"{leak_api}/v1", api_key="unused", max_retries=0, timeout=60)
    leaks, statuses = [], {"whole": 0, "stream": 0}
    for i, (family, _, _) in enumerate(CASES):
        msgs = [{"role": "user", "content": f"case {i}"}]
        stream = i % 2 == 1  # every case once, whole and streamed alternating
        try:
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in _chunks(client, msgs))
            else:
                text = client.chat.completions.create(model="tiny", messages=msgs).choices[0].message.content or ""
            statuses["stream" if stream else "whole"] += 1
        except openai.APIError as err:
            text = str(err.body)
        if leaked(text) or MARKER_RE.search(text):
            leaks.append((family, text))
    print(f"\nopenai backend leak test: {len(CASES)} outputs, answered {statuses}, leaks {len(leaks)}")
    assert not leaks, leaks[:3]
    assert len(CASES) >= 5000 and statuses["whole"] > 0 and statuses["stream"] > 0
    assert httpx.get(f"{leak_api}/healthz").status_code == 200


def _chunks(client: openai.OpenAI, msgs: list[dict]):
    yield from client.chat.completions.create(model="tiny", messages=msgs, stream=True)
