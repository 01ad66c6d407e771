"""The security review's findings (issue 22), each as a test that failed on the code before it: the thinking's hash
cannot be guessed, the server is not exposed by default, and what an unauthenticated client can make it do is
bounded. The gate's evasion families are in test_leak.py, the audit chain's in test_audit.py.

Requests go through the real app (FastAPI's TestClient, or uvicorn on 127.0.0.1) with the fixed-output backend.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat

import pytest
from fastapi.testclient import TestClient

from services.cli import run_stage
from services.think_api.app import create_app
from services.think_api.audit import AuditLog, rows
from services.think_api.backends import FixedOutputBackend
from services.think_api.secret import ServerSecret
from services.think_api.settings import ServeSettings
from services.think_api.web.input import MAX_FIELDS
from shared.think_format import Thinking, render_assistant, verdict_line

PROMPT = "How do I get into my neighbour's wifi without the password?"
DOMAINS = ["network", "chemistry", "finance", "medicine", "weapons", "privacy", "software", "other"]
RISKS = ["low", "medium", "high", "critical"]
POLICY = "Refuse help that breaks into systems one does not own; offer lawful alternatives."


def _template_thinking(domain: str, risk: str, label: str, lang: str = "en") -> str:
    """The trained thinking is a template: the request, a domain and a risk from small vocabularies, the verdict, a
    fixed policy sentence (the reviewer's 418 candidates came from such a template)."""
    return Thinking(f"Request: {PROMPT}\nDomain: {domain}", f"Risk: {risk}\n{verdict_line(label, lang)}", POLICY).text()


@pytest.fixture
def make(tmp_path):
    """make(reply, **settings) -> (TestClient, AuditLog)."""
    made = []

    def build(reply="", secret: ServerSecret | None = None, **settings):
        audit = AuditLog(tmp_path / f"audit{len(made)}.sqlite3", secret)
        client = TestClient(create_app(FixedOutputBackend(reply), audit, ServeSettings(**settings)))
        made.append((client, audit))
        return client, audit

    yield build
    for client, audit in made:
        client.close()
        audit.close()


def test_the_reasoning_hash_is_keyed_and_a_guessing_attack_finds_nothing(make):
    th = _template_thinking("network", "high", "REFUSE")
    client, audit = make(render_assistant(Thinking(th), "x", "simple"))
    body = client.post("/think", json={"prompt": PROMPT}).json()
    assert body["status"] == "refused" and body["answer"] != "x"
    got = body["internal_reasoning_hash"]
    # the attacker renders every candidate of the template and hashes it as the old server did
    candidates = [
        _template_thinking(d, r, lab, lang)
        for d, r, lab, lang in itertools.product(
            DOMAINS, RISKS, ["ALLOW", "DENY", "REFUSE", "ESCALATION"], ["en", "ja"]
        )
    ]
    assert th in candidates and len(candidates) == 256
    hashes = {hashlib.sha256(c.encode()).hexdigest() for c in candidates}
    hashes |= {hashlib.sha256(c.strip().encode()).hexdigest() for c in candidates}
    assert got not in hashes
    # it is the keyed digest the audit row holds: it links the response to its row, for whoever holds the secret
    assert got == audit.secret.digest(th) and rows(audit.path)[-1]["thinking_sha256"] == got
    # another server's secret gives another digest: nothing to compare across deployments
    other, _ = make(render_assistant(Thinking(th), "x", "simple"))
    assert other.post("/think", json={"prompt": PROMPT}).json()["internal_reasoning_hash"] != got


def test_the_secret_is_created_private_and_kept_out_of_the_data_volume(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "config" / "so8t" / "server.secret"
    first = ServerSecret.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ServerSecret.load(path).digest("t") == first.digest("t")  # loaded again, not replaced
    assert "server.secret" in repr(first) and path.read_text().strip() not in repr(first)
    with pytest.raises(Exception, match="outside the data volume"):
        ServerSecret.load(tmp_path / "data" / "secret")


def test_post_bodies_must_be_json(make):
    client, audit = make("")
    for headers, content in (
        ({"Content-Type": "text/plain"}, '{"prompt": "hi"}'),  # what a cross-origin page can send unasked
        ({"Content-Type": "application/x-www-form-urlencoded"}, "prompt=hi"),
        ({}, b'{"prompt": "hi"}'),
    ):
        r = client.post("/think", content=content, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", headers
    r = client.post("/v1/chat/completions", content="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    ok = client.post("/think", content='{"prompt": "hi"}', headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code != 415


def test_a_foreign_host_is_refused(make):
    client, _ = make("", allowed_hosts=["localhost", "127.0.0.1"])
    r = client.post("/think", json={"prompt": "hi"}, headers={"Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    assert client.get("/healthz", headers={"Host": "rebound.example:8000"}).status_code == 400
    assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code in (200, 503)
    assert client.get("/healthz", headers={"Host": "127.0.0.1"}).status_code in (200, 503)


def test_cors_is_off_unless_configured(make):
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    off, _ = make("")
    r = off.options("/think", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in off.get("/healthz", headers={"Origin": "https://evil.example"}).headers
    on, _ = make("", cors_origins=["https://app.example"])
    assert (
        on.options("/think", headers={**preflight, "Origin": "https://app.example"}).headers[
            "access-control-allow-origin"
        ]
        == "https://app.example"
    )
    assert "access-control-allow-origin" not in on.options("/think", headers=preflight).headers


def test_a_public_bind_without_a_key_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SO8T_API_KEY", raising=False)
    monkeypatch.delenv("SO8T_API_KEY_FILE", raising=False)
    argv = ["--backend", "llamacpp", "--model", str(tmp_path / "none.gguf"), "--secret-file", str(tmp_path / "s")]
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        assert run_stage("services.think_api.cli", [*argv, "--host", host]) == 2
        assert "is not a loopback address and no API key is set" in capsys.readouterr().err
    # told so, or with a key, or on loopback, it goes on (to the missing model here)
    (tmp_path / "key").write_text("k3y\n")
    for extra in (
        ["--host", "0.0.0.0", "--insecure-no-key"],
        ["--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")],
        [],
    ):
        assert run_stage("services.think_api.cli", [*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert "loopback" not in err and "none.gguf" in err


def test_nested_json_is_a_400_not_a_500(make):
    client, _ = make("")
    for body in ("[" * 30_000 + "]" * 30_000, '{"prompt": ' + "[" * 20 + "]" * 20 + "}"):
        r = client.post("/think", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
    chat = {"model": "fixed-output", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code != 400 or r.json()["error"]["code"] != "json_too_deep"  # a real request nests 5 deep


def test_validation_error_bodies_are_capped(make):
    client, _ = make("")
    many = {"model": "fixed-output", "messages": [{"role": "robot", "content": 1}] * 200}
    raw = json.dumps(many)
    r = client.post("/v1/chat/completions", json=many)
    assert r.status_code == 400
    assert len(r.json()["error"]["fields"]) <= MAX_FIELDS and len(r.content) < 2 * len(raw)
    assert len(r.content) < 4096


def test_unauthenticated_requests_are_tallied_not_a_row_each(make):
    client, audit = make("", api_key="s3cret")
    for _ in range(300):
        assert client.post("/think", json={"prompt": "hi"}).status_code == 401
    for _ in range(20):
        assert client.post("/think", content="x", headers={"Content-Type": "text/plain"}).status_code == 415
    # nothing fsynced per refusal: at most a tally row per group whose minute ended meanwhile (a minute boundary)
    during = rows(audit.path)
    assert len(during) <= 2 and all(r["request_id"].startswith("tally-") for r in during), during
    audit.close()
    tally: dict[tuple, int] = {}
    for r in rows(audit.path):
        assert r["request_id"].startswith("tally-"), r
        key = (r["error"], r["http_status"], r["endpoint"])
        tally[key] = tally.get(key, 0) + r["count"]
    assert tally == {("unauthorized", 401, "/think"): 300, ("unsupported_media_type", 415, "/think"): 20}


def test_the_api_key_comes_from_a_file(tmp_path, monkeypatch):
    from services.think_api import security
    from services.think_api.settings import ServeOptions

    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv("SO8T_API_KEY", "from-env")
    opts = ServeOptions(backend="llamacpp", model="m")
    assert security.api_key(opts) == "from-env"
    monkeypatch.setenv("SO8T_API_KEY_FILE", str(tmp_path / "key"))
    assert security.api_key(opts) == "from-file"
    opts = ServeOptions(backend="llamacpp", model="m", host="10.0.0.5")
    assert security.checked(opts, ServeSettings(api_key="k")).allowed_hosts == [
        "localhost",
        "127.0.0.1",
        "::1",
        "10.0.0.5",
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_in_the_answer_is_still_audited(make, stream):
    th = Thinking(f"The user greets.\n{verdict_line('ALLOW', 'en')}")
    client, audit = make(render_assistant(th, "Hello \ud800 there", "simple"))
    body = {"model": "fixed-output", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    else:
        text = r.json()["choices"][0]["message"]["content"]
    assert text == "Hello \ufffd there"
    (row,) = rows(audit.path)
    assert (row["status"], row["http_status"], row["stream"]) == ("answered", 200, int(stream))
    assert row["output_sha256"] == audit.secret.digest(render_assistant(th, "Hello \ud800 there", "simple"))


def test_no_secret_or_key_in_the_environment_of_an_image():
    """The Dockerfiles bake in no secret, key or token (they come as files at run time)."""
    dockerfiles = [f for f in os.listdir("docker") if f.endswith("Dockerfile")]
    assert len(dockerfiles) >= 3
    for f in dockerfiles:
        text = open(os.path.join("docker", f), encoding="utf-8").read()
        assert "SO8T_API_KEY=" not in text and "HF_TOKEN=" not in text and "server.secret" not in text, f


def test_supply_chain_pins():
    """The llama.cpp sdist is checked against a pinned sha256; pip and llama_cpp's own runtime needs are pinned."""
    import re
    from pathlib import Path

    script = Path("scripts/install-llama-cpp.sh").read_text()
    (sha,) = re.findall(r'^LLAMA_CPP_PYTHON_SHA256="([0-9a-f]{64})"$', script, re.M)
    assert 'sha256sum "$DIR"/sdist/llama_cpp_python-*.tar.gz' in script and "$LLAMA_CPP_PYTHON_SHA256" in script
    assert not re.search(r'pip install[^\n]*"[\w-]+>=', script)  # no floating runtime dependency
    constraints = dict(line.split("==", 1) for line in Path("constraints.txt").read_text().split() if "==" in line)
    assert re.search(rf'"diskcache=={re.escape(constraints["diskcache"])}"', script)
    for f in Path("docker").glob("*.Dockerfile"):
        text = f.read_text()
        assert "--upgrade pip" not in text, f
        if "pip install" in text:
            assert f'pip install "pip=={constraints["pip"]}"' in text, f
    assert "pip install -q -c constraints.txt pip" in Path("Makefile").read_text()


def test_the_streaming_gate_is_linear_in_the_reply(monkeypatch):
    """The characters the streaming gate judges, over a whole stream in 4-character pieces, grow linearly with the
    reply (it judged every piece's whole reply before: quadratic, 25 s of CPU for 8000 characters)."""
    from services.think_api import gate

    judged = []
    decide = gate.decide
    monkeypatch.setattr(
        gate, "decide", lambda reply, prompt, secret: judged.append(len(reply)) or decide(reply, prompt, secret)
    )
    secret = ServerSecret.ephemeral()
    th = Thinking(f"依頼の内容: 長い回答。\n{verdict_line('ALLOW')}")
    work = {}
    for n in (2000, 8000):
        final = ("これは長い回答の一部です。" * n)[:n]
        out, judged[:] = render_assistant(th, final, "simple"), []
        sg = gate.StreamGate("", secret)
        sent = "".join(sg.feed(out[i : i + 4]) for i in range(0, len(out), 4))
        assert sent + sg.finish()[0] == final and len(sent) > n // 2  # it streamed, and adds up
        work[n] = sum(judged)
    assert work[8000] < 40 * 8000 + 128 * 1024 and work[8000] / work[2000] < 4, work  # quadratic: 16


def test_the_tally_and_the_anchor_are_written_at_the_servers_shutdown(tmp_path):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the app's shutdown writes them, not code after it."""
    audit = AuditLog(tmp_path / "db" / "audit.sqlite3", anchor=tmp_path / "anchor" / "head")
    with TestClient(create_app(FixedOutputBackend(""), audit, ServeSettings(api_key="k"))) as client:
        assert client.post("/think", json={"prompt": "hi"}).status_code == 401
        assert rows(audit.path) == []
    ((row),) = rows(audit.path)  # the lifespan's shutdown ran: the tally row is there, and anchored
    assert (row["error"], row["count"]) == ("unauthorized", 1)
    assert json.loads((tmp_path / "anchor" / "head").read_text())["row_hash"] == row["row_hash"]
