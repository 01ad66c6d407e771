"""Serving under load: admission control (429 queue_full), health and auth answers that never wait behind
generations, requests whose client went away dropped before the backend, and connection limits (idle and slow
sockets). The app runs under uvicorn in a thread, on the FIXED-OUTPUT backend (not a model): its `delay_s` sleeps
in the backend's thread like a generation that takes that long."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from services.think_api.backends import FixedOutputBackend
from services.think_api.connections import ConnectionLimits

REPLY = "# 思考ステップ\nSECRET-THINKING 足し算。\n判定: ALLOW\n\n# 最終回答\n答えは 4 です。"
THINK = {"prompt": "2+2は？"}
CHAT = {"model": "fixed-output", "messages": [{"role": "user", "content": "2+2は？"}]}


class CountingBackend(FixedOutputBackend):
    """Counts the pieces its streams produce (a stream stopped early produces fewer)."""

    produced = 0

    def stream(self, req):
        for item in super().stream(req):
            self.produced += 1
            yield item


@pytest.fixture
def server(tmp_path):
    """server(backend, limits=None, **settings) -> (base URL, audit path)."""
    from services.think_api.app import ServeSettings, create_app, serve_background
    from services.think_api.audit import AuditLog

    stack = contextlib.ExitStack()

    def start(backend, limits: ConnectionLimits | None = None, **settings):
        db = tmp_path / f"audit{len(stack._exit_callbacks)}.sqlite3"
        app = create_app(backend, AuditLog(db), ServeSettings(**settings))
        return stack.enter_context(serve_background(app, limits=limits)), db

    with stack:
        yield start


def rows(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        conn.close()


def wait_rows(db: Path, n: int, timeout: float = 30) -> list[dict]:
    deadline = time.time() + timeout
    while len(got := rows(db)) < n and time.time() < deadline:
        time.sleep(0.05)
    return got


def in_background(fn, n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=fn, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def wait_until(cond, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.01)


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """A POST sent whole on a raw socket, left open (the test closes it: a client that goes away)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    s.sendall(head.encode() + data)
    return s


@pytest.mark.parametrize("path,body", [("/think", THINK), ("/v1/chat/completions", CHAT)])
def test_a_full_queue_is_429_at_once_with_retry_after_and_audited(server, path, body):
    backend = FixedOutputBackend(REPLY, delay_s=2.0)
    url, db = server(backend, parallel=1, max_queue=2, retry_after_s=3)
    codes: list[int] = []
    busy = in_background(lambda: codes.append(httpx.post(f"{url}{path}", json=body, timeout=60).status_code), 3)
    wait_until(lambda: len(backend.calls) == 1)  # one generating
    time.sleep(0.3)  # and two waiting
    t0 = time.perf_counter()
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    took = time.perf_counter() - t0
    assert r.status_code == 429 and took < 1.0, (r.status_code, took)
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"
    if path.startswith("/v1"):
        assert r.json()["error"]["type"] == "rate_limit_error"
    for t in busy:
        t.join(60)
    assert sorted(codes) == [200, 200, 200]  # the waiting ones were answered in turn
    got = wait_rows(db, 4)
    full = [row for row in got if row["error"] == "queue_full"]
    assert len(full) == 1 and (full[0]["status"], full[0]["http_status"]) == ("rejected", 429)
    assert len(backend.calls) == 3


def test_health_401_and_422_answer_at_once_while_the_model_is_busy_and_the_queue_full(server):
    backend = FixedOutputBackend(REPLY, delay_s=4.0)
    url, _ = server(backend, parallel=2, max_queue=8, api_key="k3y")
    auth = {"Authorization": "Bearer k3y"}
    in_background(lambda: httpx.post(f"{url}/think", json=THINK, headers=auth, timeout=60), 10)
    wait_until(lambda: len(backend.calls) == 2)
    time.sleep(0.3)
    assert httpx.post(f"{url}/think", json=THINK, headers=auth, timeout=10).status_code == 429  # queue full
    times: dict[str, list[float]] = {"healthz": [], "401": [], "422": []}
    with httpx.Client(timeout=10) as c:
        for _ in range(30):
            for name, call, status in [
                ("healthz", lambda: c.get(f"{url}/healthz"), 200),
                ("401", lambda: c.post(f"{url}/think", json=THINK), 401),
                ("422", lambda: c.post(f"{url}/think", json={"prompt": ""}, headers=auth), 422),
            ]:
                t0 = time.perf_counter()
                assert call().status_code == status
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():  # behind the 4-second generations, any of them would take seconds
        median, worst = statistics.median(ts), max(ts)
        assert median < 0.1 and worst < 1.0, f"{name}: median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_left_while_waiting_never_reaches_the_backend(server, stream):
    backend = FixedOutputBackend(REPLY, delay_s=1.5)
    url, db = server(backend, parallel=1, max_queue=4)
    first = in_background(lambda: httpx.post(f"{url}/think", json=THINK, timeout=60), 1)
    wait_until(lambda: len(backend.calls) == 1)
    gone = raw_post(url, "/v1/chat/completions", {**CHAT, "stream": stream, "messages": CHAT["messages"]})
    time.sleep(0.3)  # it waits for the slot...
    gone.close()  # ...and its client goes
    first[0].join(60)
    got = wait_rows(db, 2)
    cancelled = [r for r in got if r["endpoint"] == "/v1/chat/completions"]
    assert [(r["status"], r["error"]) for r in cancelled] == [("cancelled", "client_disconnected")]
    assert len(backend.calls) == 1  # only the first request reached the backend
    assert httpx.post(f"{url}/think", json=THINK, timeout=60).status_code == 200  # the slot was given back
    assert len(backend.calls) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_whose_client_left_stops_at_the_next_piece(server, stream):
    reply = REPLY + " 足し算は二つの数をまとめる計算です。" * 20
    backend = CountingBackend(reply, piece_chars=2, piece_delay_s=0.01)
    total = len(reply) // 2
    url, db = server(backend, parallel=1)
    gone = raw_post(url, "/v1/chat/completions", {**CHAT, "stream": stream})
    wait_until(lambda: backend.produced >= 5)
    gone.close()
    (row,) = wait_rows(db, 1)
    assert (row["status"], row["error"]) == ("cancelled", "client_disconnected")
    time.sleep(0.3)
    assert backend.produced < total / 2, (backend.produced, total)  # stopped, not run to the end


def test_idle_sockets_never_lock_out_a_fresh_client_nor_flood_the_log(server, caplog):
    limits = ConnectionLimits(idle_timeout_s=1.0, header_timeout_s=1.0, max_connections=16)
    url, _ = server(FixedOutputBackend(REPLY), limits=limits)
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(60)]  # 60 sockets that say nothing
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # headers dribbled, never finished
    t0 = time.perf_counter()
    r = httpx.get(f"{url}/healthz", timeout=5)
    assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
    time.sleep(limits.header_timeout_s + 0.5)
    for s in [*idle, slow]:  # every one was closed by the server (cap or header deadline)
        s.settimeout(2)
        assert s.recv(100) == b""
        s.close()
    with httpx.Client(timeout=5) as c:  # a keep-alive client is served, then closed when idle
        assert c.get(f"{url}/healthz").status_code == 200
    closed = [r for r in caplog.records if "connections closed" in r.getMessage()]
    assert len(closed) <= 2, [r.getMessage() for r in closed]
    assert not [r for r in caplog.records if r.exc_info]


def test_a_slowly_sent_body_is_408(server):
    url, db = server(FixedOutputBackend(REPLY), body_timeout_s=1.0)
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /think HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.perf_counter()
    s.settimeout(10)
    head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408") and time.perf_counter() - t0 < 5, head
    s.close()
    (row,) = wait_rows(db, 1)
    assert (row["status"], row["error"]) == ("rejected", "request_timeout")
