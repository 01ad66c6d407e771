"""Latency the /think API adds over calling its backend directly: p50/p99 at 1 and 16 concurrent clients, loopback.

    python bench/think_api_latency.py [--backend fixed llamacpp] [--requests 200] [--clients 1 16] [--gguf FILE]

Backends: `fixed` is the FIXED-OUTPUT backend (not a model; a preset well-formed /think reply, so the number is the
API's own cost: HTTP, JSON, validation, parse + gate, the fsynced audit row); `llamacpp` runs a GGUF in-process
(default: the tiny random Phi-3 converted to F16 here, 8 new tokens a request; its replies are malformed, so the
API withholds them, which costs the same as answering). "direct" calls backend.generate from the same number of
threads; "API" is POST /think over HTTP on 127.0.0.1 through uvicorn, one keep-alive connection per client.
Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from services.think_api.app import build_prompt, create_app, serve_background  # noqa: E402
from services.think_api.audit import AuditLog  # noqa: E402
from services.think_api.backends import FixedOutputBackend, GenRequest, LlamaCppBackend  # noqa: E402
from shared.think_format import Thinking, render_assistant, verdict_line  # noqa: E402

PROMPT = "2+2はいくつですか？"
REPLY = render_assistant(Thinking("依頼の内容: 2+2 を計算する。", f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
                                  "適用する方針: そのまま答える。"), "2+2は4です。", "simple")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def run_clients(clients: int, total: int, call) -> tuple[list[float], float]:
    """`total` calls spread over `clients` threads, each thread one after another; (latencies ms, wall s)."""
    per = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    lat: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        local = []
        state = {}
        for _ in range(n):
            t0 = time.perf_counter()
            call(state)
            local.append((time.perf_counter() - t0) * 1000)
        with lock:
            lat.extend(local)
        if "client" in state:
            state["client"].close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, per))
    return lat, time.perf_counter() - t0


def tiny_gguf(work: Path) -> Path:
    from shared.tiny import build_tiny_model

    from services.converter.hf_to_gguf import convert_f16

    out = work / "tiny-F16.gguf"
    convert_f16(build_tiny_model(work / "tiny"), out, "tiny")  # as the converter stage runs it
    return out


def bench(name: str, backend, clients_list: list[int], total: int, max_tokens: int, work: Path) -> list[dict]:
    req = GenRequest(build_prompt(PROMPT, "simple"), max_tokens, 0.0, 0.9, 1)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}
    out = []
    with serve_background(create_app(backend, AuditLog(work / f"audit-{name}.sqlite3"))) as url:
        def api_call(state: dict) -> None:
            if "client" not in state:
                state["client"] = httpx.Client(base_url=url, timeout=120)
            r = state["client"].post("/think", json=body)
            if r.status_code not in (200, 502):
                raise RuntimeError(f"/think answered {r.status_code}: {r.text}")

        run_clients(2, 20, api_call)  # warm up both paths
        run_clients(2, 20, lambda state: backend.generate(req))
        for clients in clients_list:
            direct, _ = run_clients(clients, total, lambda state: backend.generate(req))
            api, wall = run_clients(clients, total, api_call)
            out.append({"backend": name, "clients": clients, "requests": total,
                        "direct_p50": pct(direct, 50), "direct_p99": pct(direct, 99),
                        "api_p50": pct(api, 50), "api_p99": pct(api, 99),
                        "added_p50": pct(api, 50) - pct(direct, 50), "added_p99": pct(api, 99) - pct(direct, 99),
                        "api_rps": total / wall, "api_mean": statistics.fmean(api)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", choices=("fixed", "llamacpp"), default=["fixed", "llamacpp"])
    ap.add_argument("--requests", type=int, default=320, help="requests per backend and client count (320)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llamacpp (default: tiny random Phi-3, F16)")
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per llamacpp request (8)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.backend:
            if name == "fixed":
                backend = FixedOutputBackend(REPLY)
            else:
                backend = LlamaCppBackend(args.gguf or tiny_gguf(work), n_ctx=1024)
            try:
                rows += bench(name, backend, args.clients, args.requests, args.max_tokens, work)
            finally:
                backend.close()
    print(f"\n/think API latency over the backend called directly, loopback, {os.cpu_count()} CPUs, ms")
    head = (f"{'backend':<13}{'clients':>8}{'requests':>9}{'direct p50':>11}{'direct p99':>11}{'API p50':>9}"
            f"{'API p99':>9}{'added p50':>10}{'added p99':>10}{'API req/s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<13}{r['clients']:>8}{r['requests']:>9}{r['direct_p50']:>11.2f}{r['direct_p99']:>11.2f}"
              f"{r['api_p50']:>9.2f}{r['api_p99']:>9.2f}{r['added_p50']:>10.2f}{r['added_p99']:>10.2f}"
              f"{r['api_rps']:>10.1f}")


if __name__ == "__main__":
    main()
