"""The trained tiny GGUF served by llama.cpp's own `llama-server` (built from the same pinned sources as the bindings:
scripts/install-llama-cpp.sh), with `so8t serve --backend openai` in front: /think and /v1/chat/completions whole and
streamed, the engine's own usage figures in the audit, the same greedy reply as in-process llama.cpp, and a client
that leaves stopping the engine's generation. Skipped where llama-server is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_think_api_llamacpp import FINAL, TRAINED_PROMPT, think_gguf  # noqa: F401 - the session fixture

from services.pipeline.run import free_port
from services.think_api.app import build_prompt
from services.think_api.backends import GenRequest, LlamaCppBackend
from services.think_api.backends.openai import OpenAICompatBackend

pytestmark = pytest.mark.slow
SLOTS = 4


def llama_server_bin() -> Path | None:
    found = shutil.which("llama-server") or Path(sys.executable).with_name("llama-server")
    return Path(found) if Path(found).is_file() else None


def start_llama_server(gguf: Path, slots: int = SLOTS, threads: int = 2) -> tuple[subprocess.Popen, str]:
    """llama-server on `gguf` (served under its file name), waited for until /health answers 200."""
    binary = llama_server_bin()
    if binary is None:
        pytest.skip("llama-server not installed (scripts/install-llama-cpp.sh builds it)")
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--model", str(gguf), "--alias", gguf.name, "--host", "127.0.0.1", "--port", str(port)]
        + ["--parallel", str(slots), "--ctx-size", str(1024 * slots), "--threads", str(threads)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"llama-server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, f"{base}/v1"
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "llama-server did not become healthy"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def engine(think_gguf):  # noqa: F811
    proc, url = start_llama_server(think_gguf)
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


def test_llama_server_gives_the_in_process_greedy_reply_whole_and_streamed(engine, think_gguf):  # noqa: F811
    req = GenRequest(build_prompt(TRAINED_PROMPT, "simple"), 128, 0.0, 0.9, 1)
    remote = OpenAICompatBackend(engine, think_gguf.name)
    local = LlamaCppBackend(think_gguf, n_ctx=1024, n_threads=2)
    try:
        whole, mine = remote.generate(req), local.generate(req)
        items = list(remote.stream(req))
    finally:
        local.close()
    assert whole.text == mine.text and FINAL in whole.text and whole.finish_reason == "stop"
    # llama-server counts the end-of-generation token it sampled; the bindings' whole completion does not
    assert (whole.prompt_tokens, whole.completion_tokens) == (mine.prompt_tokens, mine.completion_tokens + 1)
    assert "".join(i for i in items if isinstance(i, str)) == whole.text and items[-1].text == whole.text
    assert items[-1].completion_tokens == whole.completion_tokens  # usage from the engine's stream
    ok, detail = remote.health()
    assert ok and think_gguf.name in detail
    assert not OpenAICompatBackend(engine, "another.gguf").health()[0]


def test_so8t_serve_backend_openai_in_front_of_llama_server(engine, think_gguf, tmp_path):  # noqa: F811
    """`python -m services.think_api --backend openai --upstream ...` as the stack starts it."""
    port = free_port()
    env = dict(os.environ, DATA_DIR=str(tmp_path / "data"), SO8T_API_KEY="k-123", PYTHONUNBUFFERED="1")
    env.update(SO8T_SECRET_FILE=str(tmp_path / "secret"), SO8T_REPLICA="a")
    cmd = [sys.executable, "-m", "services.think_api", "--backend", "openai", "--upstream", engine]
    cmd += ["--model", think_gguf.name, "--port", str(port), "--parallel", str(SLOTS)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base)
        auth = {"Authorization": "Bearer k-123"}
        r = httpx.post(f"{base}/think", json={"prompt": TRAINED_PROMPT, "temperature": 0}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["answer"] == FINAL and r.json()["status"] == "answered", r.text
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0)
        msgs = [{"role": "user", "content": TRAINED_PROMPT}]
        whole = client.chat.completions.create(model=think_gguf.name, messages=msgs, temperature=0)
        assert whole.choices[0].message.content == FINAL and whole.usage.completion_tokens > 20
        chunks = client.chat.completions.create(model=think_gguf.name, messages=msgs, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FINAL
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out
    dbs = sorted((tmp_path / "data" / "audit").glob("think_audit*.sqlite3"))
    assert [d.name for d in dbs] == ["think_audit-a.sqlite3"]  # the replica's own chain
    so8t = Path(sys.executable).with_name("so8t")
    checked = subprocess.run([str(so8t), "audit", "verify"], capture_output=True, text=True, env=env, timeout=60)
    assert checked.returncode == 0 and "OK, 3 rows" in checked.stdout, checked.stdout + checked.stderr


def _wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "so8t serve did not become healthy"
        time.sleep(0.2)
