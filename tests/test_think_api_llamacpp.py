"""/think and its OpenAI-compatible twin end to end on a real GGUF run in-process by llama.cpp.

The tiny random Phi-3 cannot write the /think format, so the session fixture trains it a little (the decoder
layers and the output rows of the tokens it needs, a few dozen AdamW steps on ONE /think reply to ONE prompt)
and converts it with llama.cpp's converter to GGUF F16. For that prompt the real generation is a well-formed
reply; for other prompts, or cut short by max_tokens, it is a malformed one full of thinking-like text. Both flow
through llama.cpp -> parser -> gate -> audit here, whole and streamed token by token (through the official
`openai` client), and through the `so8t serve` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from services.converter import hf_to_gguf
from services.think_api import gate
from services.think_api.app import build_prompt, create_app, serve_background
from services.think_api.audit import AuditLog, rows, verify
from services.think_api.backends import GenRequest, LlamaCppBackend
from services.think_api.secret import ServerSecret
from shared.think_format import STOP_TOKENS, Thinking, parse, render_assistant, verdict_line
from shared.tiny import teach

pytestmark = pytest.mark.slow

TRAINED_PROMPT = "2+2はいくつですか？"
KEY = ServerSecret.ephemeral()  # the server secret: keys the thinking's digest and the audit chain
THINKING = Thinking(
    "依頼の内容: 2+2 を計算する。",
    f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
    "適用する方針: そのまま答える。",
)
FINAL = "2+2は4です。足し算の基本で、いつでも同じ答えになります。"  # longer than the stream's hold-back
LLAMA_CPP = hf_to_gguf.llama_cpp_dir()


def _convert(model_dir: Path, out: Path, *extra: str) -> Path:
    """llama.cpp's converter without the converter stage's Phi-3 name: no rstrip after special tokens, so the
    generated text carries no leading "▁" and can be compared to the reply verbatim."""
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP / "gguf-py"))
    subprocess.run(
        [
            sys.executable,
            str(hf_to_gguf.converter_script()),
            str(model_dir),
            "--outtype",
            "f16",
            "--outfile",
            str(out),
            *extra,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def think_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Phi-3 trained a little to answer TRAINED_PROMPT in the simple /think format, as GGUF F16."""
    from llama_cpp import Llama

    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp converter not installed at {LLAMA_CPP} (scripts/install-llama-cpp.sh)")
    work = tmp_path_factory.mktemp("think_gguf")
    # token ids exactly as llama.cpp will see them at serving time (the HF tokenizer splits some spaces apart)
    vocab = Llama(str(_convert(tiny_model_dir, work / "vocab.gguf", "--vocab-only")), vocab_only=True, verbose=False)
    prompt = build_prompt(TRAINED_PROMPT, "simple")
    p_ids = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
    ids = vocab.tokenize(
        (prompt + render_assistant(THINKING, FINAL, "simple") + "<|end|>").encode(), add_bos=False, special=True
    )
    assert ids[: len(p_ids)] == p_ids
    del vocab

    # 300 steps at most; ~60 reach the loss bound
    trained = teach(tiny_model_dir, work / "trained", ids, start=len(p_ids), steps=300, stop_loss=1e-3)
    return _convert(trained, work / "so8t-tiny-think-F16.gguf")


@pytest.fixture(scope="module")
def backend(think_gguf):
    b = LlamaCppBackend(think_gguf, n_ctx=1024, n_threads=2)
    yield b
    b.close()


def _gen(backend, prompt: str, max_tokens: int = 128):
    return backend.generate(GenRequest(build_prompt(prompt, "simple"), max_tokens, 0.0, 0.9, 1))


def test_llama_cpp_really_generates_the_trained_reply(backend):
    g = _gen(backend, TRAINED_PROMPT)
    assert g.completion_tokens > 20 and g.prompt_tokens > 100 and g.finish_reason == "stop"
    p = parse(g.text)
    assert p.ok and (p.final, p.label, p.thinking) == (FINAL, "ALLOW", THINKING.text())
    assert _gen(backend, TRAINED_PROMPT).text == g.text  # greedy: the same reply again


def test_think_end_to_end_through_parse_gate_and_audit(backend, tmp_path):
    db = tmp_path / "audit.sqlite3"
    reply = render_assistant(THINKING, FINAL, "simple")
    upto_answer = reply[: reply.index(FINAL)]  # the whole thinking and the final heading, no answer yet
    prompt_ids = backend._llm.tokenize(build_prompt(TRAINED_PROMPT, "simple").encode(), add_bos=False, special=True)
    n_upto = len(
        backend._llm.tokenize(
            (build_prompt(TRAINED_PROMPT, "simple") + upto_answer).encode(), add_bos=False, special=True
        )
    ) - len(prompt_ids)
    assert _gen(backend, TRAINED_PROMPT, n_upto).text == upto_answer.rstrip("\n") + "\n"
    thinking_pieces = ("依頼の内容", "安全性の評価", "判定", "適用する方針", "思考ステップ", "ALLOW\n")
    with serve_background(create_app(backend, AuditLog(db, KEY))) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").json() == {
            "status": "ok",
            "backend": "llamacpp",
            "model": "so8t-tiny-think-F16.gguf",
            "detail": "model loaded",
        }
        ok = c.post("/think", json={"prompt": TRAINED_PROMPT, "temperature": 0, "max_tokens": 128})
        cut = c.post("/think", json={"prompt": TRAINED_PROMPT, "temperature": 0, "max_tokens": 12})
        empty = c.post("/think", json={"query": TRAINED_PROMPT, "temperature": 0, "max_new_tokens": n_upto})
        other = c.post("/think", json={"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 128})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert (body["answer"], body["safety_label"], body["escalated"], body["status"]) == (
        FINAL,
        "ALLOW",
        False,
        "answered",
    )
    assert body["internal_reasoning_hash"] == KEY.digest(THINKING.text())
    for r in (cut, empty):  # malformed real generations: a clear status, nothing of the thinking
        assert r.status_code == 502 and r.json()["status"] == "withheld" and r.json()["answer"] == gate.WITHHELD
    # whatever the model makes of a prompt it was not trained on, no thinking goes out
    assert other.status_code in (200, 502)
    for r in (ok, cut, empty, other):
        assert not any(piece in r.text for piece in thinking_pieces), r.text
    audit_rows = rows(db)
    assert verify(db, KEY).ok and [r["status"] for r in audit_rows][:3] == ["answered", "withheld", "withheld"]
    first, second, third, _ = audit_rows
    assert first["output_sha256"] == KEY.digest(reply)
    assert first["completion_tokens"] > 20 and first["prompt_tokens"] == len(prompt_ids)
    assert second["completion_tokens"] == 12 and second["error"] == "no final-answer heading"
    assert third["completion_tokens"] == n_upto and third["error"] == "final part is empty"
    assert third["thinking_sha256"] is None and third["output_chars"] >= len(THINKING.text())


def test_prompt_over_the_context_window_is_a_400(think_gguf, tmp_path):
    from fastapi.testclient import TestClient

    small = LlamaCppBackend(think_gguf, n_ctx=256, n_threads=1)
    try:
        with TestClient(create_app(small, AuditLog(tmp_path / "a.sqlite3"))) as c:
            r = c.post("/think", json={"prompt": "2+2? " * 40})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
        assert f"({small._llm.n_ctx()} tokens)" in r.json()["error"]["message"]
    finally:
        small.close()


def test_so8t_serve_process_with_api_key_from_env(think_gguf, tmp_path):
    """`python -m services.think_api --backend llamacpp` as the pipeline and a user start it."""
    from services.pipeline.run import free_port

    port = free_port()
    env = dict(os.environ, DATA_DIR=str(tmp_path / "data"), SO8T_API_KEY="k-123", PYTHONUNBUFFERED="1")
    env["SO8T_SECRET_FILE"] = str(tmp_path / "config" / "server.secret")  # created by the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.think_api",
            "--backend",
            "llamacpp",
            "--model",
            str(think_gguf),
            "--port",
            str(port),
            "--n-ctx",
            "1024",
            "--threads",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "so8t serve did not become healthy"
            time.sleep(0.2)
        assert httpx.post(f"{base}/think", json={"prompt": TRAINED_PROMPT}).status_code == 401
        r = httpx.post(
            f"{base}/think",
            json={"prompt": TRAINED_PROMPT, "temperature": 0},
            headers={"Authorization": "Bearer k-123"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["answer"] == FINAL
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0)
        assert _chat(client, think_gguf.name, TRAINED_PROMPT, False, temperature=0)[0] == FINAL
        assert _chat(client, think_gguf.name, TRAINED_PROMPT, True, temperature=0)[0] == FINAL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="k-12", max_retries=0).models.list()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    db = tmp_path / "data" / "audit" / "think_audit.sqlite3"
    secret = ServerSecret.load(tmp_path / "config" / "server.secret", create=False)
    assert verify(db, secret).rows == 4 and "Traceback" not in out
    # the 401 is counted in a tally row (written at shutdown), the three answers have a row each
    assert [(r["stream"], r["count"]) for r in rows(db)] == [(0, None), (0, None), (1, None), (None, 1)]
    so8t = Path(sys.executable).with_name("so8t")
    argv = [str(so8t), "audit", "verify", "--db", str(db), "--secret-file", env["SO8T_SECRET_FILE"]]
    checked = subprocess.run(argv, capture_output=True, text=True)
    assert checked.returncode == 0 and "OK, 4 rows" in checked.stdout, checked.stdout + checked.stderr
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "services.think_api",
                "--backend",
                "llamacpp",
                "--model",
                str(tmp_path / "missing.gguf"),
            ],
            capture_output=True,
            text=True,
        ).returncode
        == 2
    )


def test_stop_tokens_end_the_generation(backend):
    g = _gen(backend, TRAINED_PROMPT)
    assert not any(tok in g.text for tok in STOP_TOKENS)


def test_every_quantisation_from_the_converter_serves(request, tmp_path):
    """The converter's tiny GGUFs (random weights: never the format) load and go through the gate to the audit."""
    from fastapi.testclient import TestClient

    try:
        gguf_dir = Path(request.getfixturevalue("tiny_gguf_dir"))
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_gguf_dir fixture yet")
    files = sorted(gguf_dir.glob("*.gguf"))
    assert {f.name.rsplit("-", 1)[1] for f in files} >= {"F16.gguf", "Q8_0.gguf", "Q4_K_M.gguf"}
    for f in files:
        b = LlamaCppBackend(f, n_ctx=512, n_threads=2)
        chat = {
            "model": f.name,
            "messages": [{"role": "user", "content": TRAINED_PROMPT}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        try:
            with TestClient(create_app(b, AuditLog(tmp_path / f"{f.stem}.sqlite3"))) as c:
                r = c.post("/think", json={"prompt": TRAINED_PROMPT, "max_tokens": 16, "temperature": 0})
                events = c.post("/v1/chat/completions", json=chat).text.strip().split("\n\n")
        finally:
            b.close()
        assert r.status_code == 502 and r.json()["status"] == "withheld"
        assert events[-1] == "data: [DONE]" and '"code":"withheld"' in events[-2] and len(events) == 2
        think_row, stream_row = rows(tmp_path / f"{f.stem}.sqlite3")
        assert think_row["completion_tokens"] == stream_row["completion_tokens"] == 16 and think_row["model"] == f.name
        assert stream_row["output_sha256"] == think_row["output_sha256"]  # the same generation, token by token


def _chat(client: openai.OpenAI, model: str, prompt: str, stream: bool, **kw):
    """(content or None when withheld, everything received serialised, the response or the chunks)."""
    got: list = []
    try:
        if not stream:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)
            return r.choices[0].message.content, r.model_dump_json(), r
        for ch in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        ):
            got.append(ch)
        text = "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices)
        return text, "".join(ch.model_dump_json() for ch in got), got
    except openai.APIError as err:
        assert err.code == "withheld", err.message
        return None, "".join(ch.model_dump_json() for ch in got) + f"{err.message} {err.body}", got


def test_openai_client_gets_what_think_answers_whole_and_token_by_token(backend, tmp_path):
    db = tmp_path / "audit.sqlite3"
    model = backend.model
    thinking_pieces = ("依頼の内容", "安全性の評価", "判定", "適用する方針", "思考ステップ", "ALLOW\n")
    with serve_background(create_app(backend, AuditLog(db, KEY))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        think = httpx.post(
            f"{url}/think", json={"prompt": TRAINED_PROMPT, "temperature": 0, "max_tokens": 128}, timeout=60
        ).json()
        whole, whole_raw, r = _chat(c, model, TRAINED_PROMPT, False, temperature=0, max_tokens=128)
        streamed, stream_raw, chunks = _chat(c, model, TRAINED_PROMPT, True, temperature=0, max_tokens=128)
        received = [whole_raw, stream_raw]
        for prompt, max_tokens in (("What is 2+2?", 128), (TRAINED_PROMPT, 12), ("こんにちは", 64)):
            for stream in (False, True):  # malformed real generations, or whatever the model makes of them
                received.append(_chat(c, model, prompt, stream, temperature=0, max_tokens=max_tokens)[1])
    assert think["answer"] == whole == streamed == FINAL
    assert r.so8t["internal_reasoning_hash"] == think["internal_reasoning_hash"] == KEY.digest(THINKING.text())
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 1 and pieces[0] == FINAL[: len(pieces[0])]  # the answer streamed as it was generated
    prompt_ids = backend._llm.tokenize(build_prompt(TRAINED_PROMPT, "simple").encode(), add_bos=False, special=True)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
    )
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens > 20
    for text in received:
        assert not any(piece in text for piece in thinking_pieces), text
    audit_rows = rows(db)
    assert verify(db, KEY).ok and len(audit_rows) == 9
    assert [(row["endpoint"], row["stream"]) for row in audit_rows[:3]] == [
        ("/think", 0),
        ("/v1/chat/completions", 0),
        ("/v1/chat/completions", 1),
    ]
    assert {row["completion_tokens"] for row in audit_rows[:3]} == {r.usage.completion_tokens}
    assert {row["output_sha256"] for row in audit_rows[:3]} == {KEY.digest(render_assistant(THINKING, FINAL, "simple"))}
    assert audit_rows[4]["status"] == "withheld" and audit_rows[6]["error"] == "no final-answer heading"
