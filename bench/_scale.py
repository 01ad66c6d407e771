"""Table 3 of bench/think_api_latency.py: the think API scaled out over llama.cpp's `llama-server` (see its docstring).

(a) the API on in-process llama.cpp, (b) llama-server with SLOTS slots called directly, (c) the API in front of (b);
1, 4 and 16 clients, the same trained GGUF, greedy. Whole requests give req/s and p50/p99; streamed ones the time to
the first byte. Then /healthz while (c) is overloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.pipeline.run import free_port  # noqa: E402
from services.think_api.app import ServeSettings, build_prompt, create_app, serve_background  # noqa: E402
from services.think_api.audit import AuditLog  # noqa: E402
from services.think_api.backends import LlamaCppBackend  # noqa: E402
from services.think_api.backends.openai import OpenAICompatBackend  # noqa: E402
from shared.think_format import STOP_TOKENS  # noqa: E402

PROMPT = "2+2はいくつですか？"
SLOTS = 4
CLIENTS = (1, 4, 16)
MAX_TOKENS = 256
ERRORS: list[str] = []  # requests retried after a closed keep-alive connection


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


@contextlib.contextmanager
def llama_server(gguf: Path, threads: int) -> Iterator[str]:
    binary = Path(sys.executable).with_name("llama-server")
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--alias", gguf.name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--parallel", str(SLOTS), "--ctx-size", str(1024 * SLOTS), "--threads", str(threads)]
    cmd += ["--threads-http", "40"]  # a thread per client connection (its default is far fewer than 16 clients)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"llama-server did not start ({' '.join(cmd)})")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def run_clients(clients: int, per_client: int, call: Callable[[httpx.Client], float | None]) -> tuple[list, float]:
    """Each of `clients` threads makes `per_client` calls on its own keep-alive connection; (results, wall s)."""
    out: list = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=600) as c:
            got = [call(c) for _ in range(per_client)]
        with lock:
            out.extend(got)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def whole_call(url: str, direct: bool, model: str) -> Callable[[httpx.Client], float]:
    if direct:
        body = {"model": model, "prompt": build_prompt(PROMPT, "simple"), "max_tokens": MAX_TOKENS}
        body |= {"temperature": 0.0, "stop": list(STOP_TOKENS)}
        path = f"{url}/completions"
    else:
        body, path = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}, f"{url}/think"

    def call(c: httpx.Client) -> float:
        t0 = time.perf_counter()
        try:
            r = c.post(path, json=body)
        except httpx.RemoteProtocolError:  # a keep-alive connection the server closed: counted, asked again
            ERRORS.append(path)
            r = c.post(path, json=body)
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    return call


def first_byte_call(url: str, direct: bool, model: str) -> Callable[[httpx.Client], float]:
    """ms to the first text piece of a streamed reply ((b) the engine's first token, else the answer's first byte)."""
    if direct:
        body = {"model": model, "prompt": build_prompt(PROMPT, "simple"), "max_tokens": MAX_TOKENS, "stream": True}
        body |= {"temperature": 0.0, "stop": list(STOP_TOKENS)}
        path = f"{url}/completions"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
        body |= {"temperature": 0.0, "stream": True}
        path = f"{url}/v1/chat/completions"

    def call(c: httpx.Client) -> float:
        t0, first = time.perf_counter(), float("nan")
        with c.stream("POST", path, json=body) as r:
            for line in r.iter_lines():
                if first != first and line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("text") or (choices[0].get("delta") or {}).get("content"):
                        first = (time.perf_counter() - t0) * 1000
        return first

    return call


def measure(name: str, url: str, direct: bool, model: str, per_client: int) -> list[dict]:
    rows = []
    run_clients(2, 2, whole_call(url, direct, model))  # warm up
    for clients in CLIENTS:
        lat, wall = run_clients(clients, per_client, whole_call(url, direct, model))
        first, _ = run_clients(clients, max(1, per_client // 2), first_byte_call(url, direct, model))
        rows.append(
            {
                "mode": name,
                "clients": clients,
                "requests": len(lat),
                "rps": len(lat) / wall,
                "p50": pct(lat, 50),
                "p99": pct(lat, 99),
                "first_p50": pct(first, 50),
            }
        )
    return rows


def healthz_overloaded(url: str, clients: int) -> tuple[float, int, int]:
    """/healthz p99 (ms) while `clients` whole requests hammer the API; (p99, 200s, 429s) of those requests."""
    stop = threading.Event()
    codes: list[int] = []

    def hammer() -> None:
        with httpx.Client(timeout=600) as c:
            while not stop.is_set():
                codes.append(c.post(f"{url}/think", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS}).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2)
    lat = []
    with httpx.Client(timeout=10) as c:
        for _ in range(100):
            t0 = time.perf_counter()
            c.get(f"{url}/healthz")
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    return pct(lat, 99), codes.count(200), codes.count(429)


def scale_tables(gguf: Path, per_client: int, work: Path) -> None:
    threads = os.cpu_count() or 2
    rows: list[dict] = []
    local = LlamaCppBackend(gguf, n_ctx=1024, n_threads=threads)
    with serve_background(create_app(local, AuditLog(work / "audit-a.sqlite3"))) as url:
        rows += measure("(a) API + in-process llama.cpp", url, False, gguf.name, per_client)
    local.close()
    with llama_server(gguf, threads) as engine:
        rows += measure(f"(b) llama-server {SLOTS} slots, direct", engine, True, gguf.name, per_client)
        remote = OpenAICompatBackend(engine, gguf.name, parallel=SLOTS)
        settings = ServeSettings(parallel=SLOTS, max_queue=16)  # every client of the table waits its turn
        with serve_background(create_app(remote, AuditLog(work / "audit-c.sqlite3"), settings)) as url:
            rows += measure("(c) API + (b), --backend openai", url, False, gguf.name, per_client)
            health = healthz_overloaded(url, 40)
    print_scale(rows, health)


def print_scale(rows: list[dict], health: tuple[float, int, int]) -> None:
    print(f"\nscaling out: the same trained GGUF, greedy, up to {MAX_TOKENS} tokens, {os.cpu_count()} CPUs, loopback")
    head = f"{'mode':<36}{'clients':>8}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'first byte p50':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['mode']:<36}{r['clients']:>8}{r['requests']:>9}{r['rps']:>8.2f}{r['p50']:>9.0f}{r['p99']:>9.0f}"
            f"{r['first_p50']:>15.0f}"
        )
    by = {(r["mode"][:3], r["clients"]): r["rps"] for r in rows}
    for n in CLIENTS:
        a, b, c = by[("(a)", n)], by[("(b)", n)], by[("(c)", n)]
        print(f"{n:>2} clients: (c)/(b) = {c / b:.2f}, (c)/(a) = {c / a:.2f}")
    if ERRORS:
        print(f"({len(ERRORS)} requests asked again after the server closed a keep-alive connection)")
    p99, ok, full = health
    print(
        f"/healthz p99 with (c) overloaded (40 clients, {SLOTS} slots + 16 waiting): {p99:.1f} ms; "
        f"{ok} answered, {full} 429"
    )
