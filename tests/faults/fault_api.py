"""The fault campaign's think-API jobs: the real server SIGKILLed under concurrent load, and a schemathesis fuzz of
the app's own OpenAPI schema.

Promises checked: every HTTP 200 the clients received (a whole JSON answer, or a stream that reached its finish
chunk) has its audit row; the audit chain verifies (`so8t audit verify`) after every kill and restart; no audit
row and no response body holds the thinking; the fuzz never gets a 500 or a traceback. Used by
tests/faults/test_api_faults.py (a few kills, a few dozen cases) and by a campaign script (more of each).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fault_core import REPO, Tally, cli, env

TESTS = REPO / "tests"
if str(TESTS) not in sys.path:  # the stand-in Ollama server lives with the Ollama stage's tests
    sys.path.insert(0, str(TESTS))

from services.ollama import modelfile  # noqa: E402
from shared.think_format import Thinking, render_assistant, verdict_line  # noqa: E402

MODEL = "so8t-think:q4_k_m"
CANARY = "canary-thinking-7f3a9c"  # in the thinking of every reply; must never leave the server or enter the log
THOUGHTS = (
    f"依頼の内容: 2+2 を計算する。{CANARY}",
    f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
    "適用する方針: そのまま答える。",
)
ANSWER = "2+2は4です。"
REPLY = render_assistant(Thinking(*THOUGHTS), ANSWER, "simple")
# what of the thinking must not appear anywhere: the canary and each section's distinctive first line
SECRETS = (CANARY, "依頼の内容: 2+2 を計算する", "安全性の評価: 問題なし", "適用する方針: そのまま答える")
TRACEBACK = ("Traceback (most recent call last)", 'File "/')


def leaks(text: str) -> list[str]:
    """The pieces of the thinking in `text` (JSON escapes of non-ASCII decoded first)."""
    texts = [text]
    if "\\u" in text:
        with contextlib.suppress(UnicodeDecodeError):
            texts.append(text.encode("ascii", "backslashreplace").decode("unicode_escape"))
    return [s for s in SECRETS if any(s in t for t in texts)]


@dataclass
class ApiTally(Tally):
    """A Tally (one campaign-table row) with the run's figures beside it."""

    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "figures": self.figures}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def standin_ollama():
    """The repo's stand-in Ollama server (tests/test_ollama.py), started, replying REPLY, with MODEL imported."""
    from test_ollama import StandInOllama

    s = StandInOllama(reply=lambda prompt: REPLY)
    s.start()
    s.models[MODEL] = {"template": modelfile.TEMPLATE}
    return s


# --- the server, killed under load ----------------------------------------------------------------------------


class Server:
    """`python -m services.think_api --backend ollama` on `port` with audit database `db`, as a subprocess."""

    def __init__(self, ollama_url: str, port: int, db: Path, log: Path):
        self.ollama_url, self.port, self.db, self.log = ollama_url, port, db, log
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90) -> float:
        """Start it and wait for /healthz 200; returns the seconds that took."""
        import httpx

        t0 = time.monotonic()
        argv = cli("services.think_api", "--backend", "ollama", "--model", MODEL, "--port", self.port)
        argv += ["--audit-db", str(self.db), "--secret-file", str(secret_file(self.db))]
        argv += ["--timeout", "30", "--keepalive", "5"]
        environ = env(OLLAMA_HOST=self.ollama_url)
        environ.pop("SO8T_API_KEY", None)
        with open(self.log, "ab") as out, open(os.devnull, "rb") as devnull:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=environ, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"think API exited {self.proc.returncode} at start:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"think API not healthy within {timeout:g} s:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Reply:
    kind: str  # think | chat | stream
    status: int | None  # None: no HTTP status (refused, reset)
    outcome: str  # answered | refused | cut | http_<status> | stream_error
    request_id: str | None = None
    leaked: list[str] = field(default_factory=list)
    problem: str | None = None  # a broken promise seen by the client itself


def _think(client, url: str, i: int) -> Reply:
    r = client.post(f"{url}/think", json={"prompt": f"2+2は？ #{i}", "max_tokens": 64, "temperature": 0, "seed": i})
    rep = Reply("think", r.status_code, "answered" if r.status_code == 200 else f"http_{r.status_code}")
    rep.leaked = leaks(r.text)
    rid = r.headers.get("x-request-id")
    if r.status_code == 200:
        body = r.json()
        rep.request_id = body.get("request_id")
        if body.get("answer") != ANSWER or rid != rep.request_id:
            rep.problem = f"/think 200 with answer {body.get('answer')!r}, request_id {rep.request_id} header {rid}"
    return rep


def _chat_body(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"2+2は？ #{i}"}],
        "max_tokens": 64,
        "temperature": 0,
        "seed": i,
        "stream": stream,
    }


def _chat(client, url: str, i: int) -> Reply:
    r = client.post(f"{url}/v1/chat/completions", json=_chat_body(i, False))
    rep = Reply("chat", r.status_code, "answered" if r.status_code == 200 else f"http_{r.status_code}")
    rep.leaked = leaks(r.text)
    if r.status_code == 200:
        body = r.json()
        rep.request_id = (body.get("so8t") or {}).get("request_id")
        answer = body["choices"][0]["message"]["content"]
        if answer != ANSWER or r.headers.get("x-request-id") != rep.request_id:
            rep.problem = f"chat 200 with answer {answer!r}, request_id {rep.request_id}"
    return rep


def _stream(client, url: str, i: int) -> Reply:
    import httpx

    rep = Reply("stream", None, "cut")
    text, finished, done, errored = [], False, False, False
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=_chat_body(i, True)) as r:
            rep.status = r.status_code
            rep.request_id = r.headers.get("x-request-id")
            if r.status_code != 200:
                r.read()
                rep.outcome, rep.leaked = f"http_{r.status_code}", leaks(r.text)
                return rep
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                rep.leaked += leaks(data)
                if data == "[DONE]":
                    done = True
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    errored = True
                    continue
                for ch in ev.get("choices") or []:
                    text.append((ch.get("delta") or {}).get("content") or "")
                    finished = finished or ch.get("finish_reason") is not None
    except (httpx.TransportError, json.JSONDecodeError):  # the server died mid-stream: a cut, not an answer
        pass
    if finished and not errored:
        rep.outcome = "answered"  # the finish chunk goes out only after the row is written
        if "".join(text) != ANSWER:
            rep.problem = f"stream {rep.request_id} answered {''.join(text)!r}"
    elif errored:
        rep.outcome = "stream_error"
    elif done:
        rep.problem = f"stream {rep.request_id}: [DONE] without a finish chunk"
    return rep


CALLS = {"think": _think, "chat": _chat, "stream": _stream}


def _client_loop(url: str, kinds: list[str], stop: threading.Event, out: list[Reply], counter) -> None:
    import httpx

    with httpx.Client(timeout=httpx.Timeout(30, connect=5)) as client:
        for kind in itertools.cycle(kinds):
            if stop.is_set():
                return
            i = next(counter)
            try:
                rep = CALLS[kind](client, url, i)
            except httpx.TransportError as err:
                rep = Reply(kind, None, "refused" if isinstance(err, httpx.ConnectError) else "cut")
            except Exception as err:  # anything else is the client's surprise: shown, not swallowed
                rep = Reply(kind, None, "client_error", problem=f"{kind} #{i}: {type(err).__name__}: {err}")
            out.append(rep)
            if rep.status is None:
                time.sleep(0.05)  # the server is down: do not spin


def secret_file(db: Path) -> Path:
    """The server secret of the server auditing to `db` (created by it on first start)."""
    return db.parent / "secret" / "server.secret"


def _verify(db: Path) -> subprocess.CompletedProcess:
    """`so8t audit verify --db DB --secret-file F`, as its own process."""
    argv = cli("services", "audit", "verify", "--db", db, "--secret-file", secret_file(db))
    return subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def kill_api_under_load(
    tmp: Path,
    kills: int = 2,
    clients: int = 16,
    load_s: float = 4.0,
    kinds: tuple[str, ...] = ("think", "chat", "stream"),
) -> ApiTally:
    """The real server under `clients` threads of /think, chat and streamed chat requests, SIGKILLed `kills`
    times `load_s` seconds into each life and restarted on the same audit database. Each request is a trial."""
    from services.think_api import audit

    t0 = time.monotonic()
    tally = ApiTally("think-api", f"SIGKILL x{kills} under {clients}-client load")
    tmp.mkdir(parents=True, exist_ok=True)
    db = tmp / "audit.sqlite3"
    ollama = standin_ollama()
    server = Server(ollama.url.removeprefix("http://"), free_port(), db, tmp / "server.log")
    replies: list[Reply] = []
    stop = threading.Event()
    counter = itertools.count()
    threads: list[threading.Thread] = []
    starts: list[float] = []
    verifies_after_kill: list[str] = []
    try:
        starts.append(server.start())
        for n in range(clients):
            order = list(kinds[n % len(kinds) :] + kinds[: n % len(kinds)])  # each thread its own mix
            threads.append(
                threading.Thread(target=_client_loop, args=(server.url, order, stop, replies, counter), daemon=True)
            )
        for t in threads:
            t.start()
        for k in range(kills):
            time.sleep(load_s)
            server.kill()
            r = _verify(db)  # the chain as the kill left it
            if r.returncode != 0:
                verifies_after_kill.append(f"after kill {k + 1}: {r.stdout.strip()} {r.stderr.strip()[-500:]}")
            try:
                starts.append(server.start())
            except RuntimeError as err:
                tally.check(f"restart {k + 1} on the same audit database failed: {err}")
                break
        time.sleep(load_s)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.kill()
        ollama.stop()

    rows = audit.rows(db) if db.exists() else []
    by_id = {r["request_id"]: r for r in rows}
    unaudited = 0
    for rep in replies:
        if rep.problem:
            tally.bad(rep.problem)
        elif rep.leaked:
            tally.bad(f"{rep.kind} {rep.request_id}: the thinking reached the client ({rep.leaked})")
        elif rep.status is not None and rep.status >= 500 and rep.status not in (502, 503, 504):
            tally.bad(f"{rep.kind} {rep.request_id}: HTTP {rep.status}")
        elif rep.outcome == "answered" and rep.request_id not in by_id:
            unaudited += 1
            tally.bad(f"{rep.kind} {rep.request_id}: a 200 answer with no audit row")
        elif rep.outcome == "answered" and by_id[rep.request_id]["http_status"] != 200:
            tally.bad(f"{rep.kind} {rep.request_id}: audited as HTTP {by_id[rep.request_id]['http_status']}")
        else:
            tally.ok(rep.outcome)
    for why in verifies_after_kill:
        tally.check(f"audit verify {why}")
    final = _verify(db)
    tally.check(None if final.returncode == 0 else f"audit verify at the end: {final.stdout} {final.stderr[-500:]}")
    if len(by_id) != len(rows):
        tally.check(f"{len(rows) - len(by_id)} audit rows share a request_id")
    for r in rows:
        if found := leaks(json.dumps(r, ensure_ascii=False)):
            tally.check(f"audit row seq={r['seq']} holds the thinking ({found})")
    # a server killed while sending leaves the stand-in an empty body ({}): only whole requests are judged
    if not all(g.get("raw") is True for g in ollama.generates if "model" in g):
        tally.check("a request reached Ollama without raw mode")

    answered = [r for r in replies if r.outcome == "answered"]
    tally.seconds = time.monotonic() - t0
    tally.figures = {
        "requests": len(replies),
        "answered_200": len(answered),
        "answered_by_kind": {k: sum(r.kind == k for r in answered) for k in kinds},
        "kills": kills,
        "restarts": len(starts) - 1,
        "start_s": [round(s, 2) for s in starts],
        "rows": len(rows),
        "unaudited": unaudited,
        "audit_verify": final.stdout.strip(),
        "backend_calls": len(ollama.generates),
    }
    tally.notes.append(f"{kills} kills; {len(answered)} answers, {len(rows)} rows, {unaudited} unaudited")
    return tally


# --- schemathesis against the app's own schema ----------------------------------------------------------------


def fuzz_api(
    tmp: Path, max_examples: int = 30, seed_modes: tuple[str, ...] = ("positive", "negative", "steered")
) -> ApiTally:
    """Every operation of the app's OpenAPI schema, `max_examples` schemathesis cases per generation mode
    (derandomized), against the app served in this process with a fixed-output backend whose thinking holds the
    canary. No case may get a 500, a traceback or any of the thinking; each case is a trial."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    from services.think_api.app import ServeSettings, create_app, serve_background
    from services.think_api.audit import AuditLog
    from services.think_api.backends import FixedOutputBackend

    t0 = time.monotonic()
    tally = ApiTally("think-api", "schemathesis fuzz of its OpenAPI schema")
    tmp.mkdir(parents=True, exist_ok=True)
    log = AuditLog(tmp / "fuzz_audit.sqlite3")
    app = create_app(FixedOutputBackend(REPLY, model=MODEL), log, ServeSettings())
    per_op: dict[str, int] = {}
    statuses: dict[str, dict[str, int]] = {}
    session = requests.Session()
    with serve_background(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()
            label = f"{op.method.upper()} {op.path}"
            for mode in seed_modes:
                if mode == "steered" and op.method.upper() != "POST":
                    continue
                strategy = op.as_strategy(generation_mode=GenerationMode("positive" if mode == "steered" else mode))
                if mode == "steered":  # past the documented rejections, to the backend and the gate
                    strategy = strategy.map(_steer)
                _fuzz_one(
                    strategy,
                    f"{label} [{mode}]",
                    url,
                    session,
                    max_examples,
                    per_op,
                    statuses,
                    tally,
                )
    for r in _rows(tmp / "fuzz_audit.sqlite3"):
        if found := leaks(json.dumps(r, ensure_ascii=False)):
            tally.check(f"fuzz audit row seq={r['seq']} holds the thinking ({found})")
    log.close()
    tally.seconds = time.monotonic() - t0
    tally.figures = {"cases": sum(per_op.values()), "cases_per_operation": per_op, "statuses": statuses}
    tally.notes.append(f"{len(per_op)} operation x mode runs, {sum(per_op.values())} cases")
    return tally


CHAT_KEEP = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream", "n", "stop", "user")


def _steer(case):
    """A positive case moved past the rejections the schema documents but cannot express (exactly one of prompt
    or query; the one model; text-only messages ending with the user's): its other fields stay fuzzed."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return case
    if case.path == "/think":
        if "prompt" in body and "query" in body:
            del body["query"]
        if "prompt" not in body and "query" not in body:
            body["prompt"] = "2+2は？"
        if "max_tokens" in body and "max_new_tokens" in body:
            del body["max_new_tokens"]
        for k in ("max_tokens", "max_new_tokens"):
            if isinstance(body.get(k), int) and body[k] > 2048:
                body[k] = 2048
    elif case.path.endswith("/chat/completions"):
        content = next((m.get("content") for m in body.get("messages") or [] if isinstance(m.get("content"), str)), "")
        steered = {k: v for k, v in body.items() if k in CHAT_KEEP}
        steered.update(model=MODEL, messages=[{"role": "user", "content": content or "2+2は？"}])
        case.body = steered
    return case


def _fuzz_one(
    strategy, label: str, url: str, session, max_examples: int, per_op: dict, statuses: dict, tally: Tally
) -> None:
    """`max_examples` cases of one operation in one generation mode, each called and judged (never raised: all the
    cases run, each broken promise is a violation)."""
    import hypothesis

    @hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def one(case) -> None:
        resp = case.call(base_url=url, session=session, timeout=30)
        per_op[label] = per_op.get(label, 0) + 1
        statuses.setdefault(label, {}).setdefault(str(resp.status_code), 0)
        statuses[label][str(resp.status_code)] += 1
        text = resp.text
        where = f"{label} -> {resp.status_code}: {case.as_curl_command()}"
        if resp.status_code >= 500 and resp.status_code not in (502, 503, 504):
            tally.bad(f"{where}\n  body: {text[:1000]}")
        elif any(t in text for t in TRACEBACK):
            tally.bad(f"{where}\n  a traceback in the body: {text[:1000]}")
        elif found := leaks(text):
            tally.bad(f"{where}\n  the thinking in the body: {found}")
        else:
            tally.ok(f"{resp.status_code // 100}xx")

    try:
        one()
    except hypothesis.errors.Unsatisfiable:  # negative cases of an operation without inputs: none exist
        per_op.setdefault(label, 0)


def _rows(db: Path) -> list[dict[str, Any]]:
    from services.think_api import audit

    return audit.rows(db)
