"""Latency of the think API, loopback: what it adds over its backend, and when the answer's first byte arrives.

    python bench/think_api_latency.py [--backend fixed llamacpp] [--tables 1 2] [--requests 320] [--clients 1 16]
                                      [--gguf FILE] [--stream-requests 40]

Table 1, the API's own cost: p50/p99 at 1 and 16 concurrent clients. Backends: `fixed` is the FIXED-OUTPUT
backend (not a model; a preset well-formed /think reply, so the number is the API's own cost: HTTP, JSON,
validation, parse + gate, the fsynced audit row); `llamacpp` runs a GGUF in-process (default: the tiny random
Phi-3 converted to F16 here, 8 new tokens a request; its replies are malformed, so the API withholds them, which
costs the same as answering). "direct" calls backend.generate from the same number of threads; "API" is POST
/think over HTTP on 127.0.0.1 through uvicorn, one keep-alive connection per client.

Table 2, time to the first byte of the answer and to the end, one client: POST /think, POST /v1/chat/completions
whole, and the same streamed (first byte = the first content delta). Backends that write a whole well-formed
reply: `fixed` paced like a model (a piece of 3 characters every 5 ms; whole replies take as long), and
`llamacpp` on the tiny Phi-3 trained here to write one /think reply (thinking, then a final part of about 90
characters) and converted to F16 as the converter stage does.

Table 3, scaling out (`--tables 3`): 1, 4 and 16 clients against (a) the API on in-process llama.cpp (one
generation at a time), (b) llama.cpp's `llama-server` with 4 slots called directly (POST /v1/completions with the
rendered prompt), (c) the API in front of (b) (`--backend openai`), all on the same trained GGUF, greedy:
req/s, p50/p99 latency of whole requests, and the time to the first byte streamed ((b): the first token, thinking
included; (a), (c): the first byte of the answer, after the gate). Then /healthz p99 while (c) is overloaded
(more clients than slots + waiting room: some get 429). Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
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
THINKING = Thinking(
    "依頼の内容: 2+2 を計算する。",
    f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
    "適用する方針: そのまま答える。",
)
REPLY = render_assistant(THINKING, "2+2は4です。", "simple")
LONG_FINAL = (
    "2+2は4です。足し算は二つの数をまとめる計算で、順番を入れ替えても答えは同じです。"
    "たとえば2個のりんごに2個のりんごを足すと、りんごは全部で4個になります。いつでも4です。"
)
LONG_REPLY = render_assistant(THINKING, LONG_FINAL, "simple")
PACE = (3, 0.005)  # the paced fixed backend: characters per piece, seconds between pieces


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
    from services.converter.hf_to_gguf import convert_f16
    from shared.tiny import build_tiny_model

    out = work / "tiny-F16.gguf"
    convert_f16(build_tiny_model(work / "tiny"), out, "tiny")  # as the converter stage runs it
    return out


def think_gguf(work: Path) -> Path:
    """The tiny Phi-3 trained to answer PROMPT with LONG_REPLY, converted to F16 as the converter stage does."""
    from llama_cpp import Llama

    from services.converter.hf_to_gguf import convert_f16
    from shared.tiny import build_tiny_model, teach

    tiny = build_tiny_model(work / "tiny-think")
    convert_f16(tiny, work / "vocab-F16.gguf", "tiny")
    vocab = Llama(str(work / "vocab-F16.gguf"), vocab_only=True, verbose=False)
    prompt = build_prompt(PROMPT, "simple")
    p_ids = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
    ids = vocab.tokenize((prompt + LONG_REPLY + "<|end|>").encode(), add_bos=False, special=True)
    del vocab
    trained = teach(tiny, work / "trained-think", ids, start=len(p_ids), steps=300, stop_loss=1e-3)
    out = work / "think-F16.gguf"
    convert_f16(trained, out, "tiny")
    return out


def first_byte_and_total(client: httpx.Client, path: str, body: dict, stream: bool) -> tuple[float, float, str]:
    """(ms to the answer's first byte, ms to the end, the answer) of one request."""
    t0 = time.perf_counter()
    if not stream:
        r = client.post(path, json=body)
        t = (time.perf_counter() - t0) * 1000
        data = r.json()
        return t, t, data["answer"] if "answer" in data else data["choices"][0]["message"]["content"]
    first, parts = None, []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            piece = event["choices"][0]["delta"]["content"] if event.get("choices") else None
            if piece:
                first = first if first is not None else (time.perf_counter() - t0) * 1000
                parts.append(piece)
    return first if first is not None else float("nan"), (time.perf_counter() - t0) * 1000, "".join(parts)


def streaming_bench(name: str, backend, requests: int, max_tokens: int, work: Path) -> list[dict]:
    """Table 2's rows for one backend: /think, /v1 whole, /v1 streamed, one client, `requests` each."""
    think = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}
    chat = {
        "model": backend.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
    }
    modes = [
        ("POST /think", "/think", think, False),
        ("/v1 whole", "/v1/chat/completions", chat, False),
        ("/v1 stream", "/v1/chat/completions", chat, True),
    ]
    out = []
    with (
        serve_background(create_app(backend, AuditLog(work / f"audit-stream-{name}.sqlite3"))) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        for _, path, body, stream in modes:  # warm up
            first_byte_and_total(client, path, body, stream)
        runs: dict[str, list[tuple[float, float, str]]] = {label: [] for label, *_ in modes}
        for _ in range(requests):  # the modes take turns, so a busy machine slows each of them alike
            for label, path, body, stream in modes:
                runs[label].append(first_byte_and_total(client, path, body, stream))
        for label, got in runs.items():
            answers = {a for _, _, a in got}
            first, total = [f for f, _, _ in got], [t for _, t, _ in got]
            out.append(
                {
                    "backend": name,
                    "mode": label,
                    "requests": requests,
                    "first_p50": pct(first, 50),
                    "first_p99": pct(first, 99),
                    "total_p50": pct(total, 50),
                    "total_p99": pct(total, 99),
                    "answer_chars": len(answers.pop()) if len(answers) == 1 else -1,
                }
            )
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
            out.append(
                {
                    "backend": name,
                    "clients": clients,
                    "requests": total,
                    "direct_p50": pct(direct, 50),
                    "direct_p99": pct(direct, 99),
                    "api_p50": pct(api, 50),
                    "api_p99": pct(api, 99),
                    "added_p50": pct(api, 50) - pct(direct, 50),
                    "added_p99": pct(api, 99) - pct(direct, 99),
                    "api_rps": total / wall,
                    "api_mean": statistics.fmean(api),
                }
            )
    return out


def paced_or_trained(name: str, work: Path):
    """Table 2's backend: the fixed reply paced like a model, or the GGUF trained to write it."""
    if name == "llamacpp":
        return LlamaCppBackend(think_gguf(work), n_ctx=1024)
    chars, gap = PACE
    whole_s = gap * -(-len(LONG_REPLY) // chars)  # a whole reply takes as long as its pieces
    return FixedOutputBackend(LONG_REPLY, delay_s=whole_s, piece_chars=chars, piece_delay_s=gap)


def print_overhead(rows: list[dict]) -> None:
    print(f"\n/think API latency over the backend called directly, loopback, {os.cpu_count()} CPUs, ms")
    head = (
        f"{'backend':<13}{'clients':>8}{'requests':>9}{'direct p50':>11}{'direct p99':>11}{'API p50':>9}"
        f"{'API p99':>9}{'added p50':>10}{'added p99':>10}{'API req/s':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['backend']:<13}{r['clients']:>8}{r['requests']:>9}{r['direct_p50']:>11.2f}{r['direct_p99']:>11.2f}"
            f"{r['api_p50']:>9.2f}{r['api_p99']:>9.2f}{r['added_p50']:>10.2f}{r['added_p99']:>10.2f}"
            f"{r['api_rps']:>10.1f}"
        )


def print_first_byte(rows: list[dict]) -> None:
    print("\ntime to the answer's first byte and to the end, one client, ms (answer: characters, -1 if they varied)")
    head = (
        f"{'backend':<10}{'mode':<13}{'requests':>9}{'first p50':>11}{'first p99':>11}{'total p50':>11}"
        f"{'total p99':>11}{'answer':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['backend']:<10}{r['mode']:<13}{r['requests']:>9}{r['first_p50']:>11.1f}{r['first_p99']:>11.1f}"
            f"{r['total_p50']:>11.1f}{r['total_p99']:>11.1f}{r['answer_chars']:>8}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", choices=("fixed", "llamacpp"), default=["fixed", "llamacpp"])
    ap.add_argument("--tables", nargs="+", type=int, choices=(1, 2, 3), default=[1, 2])
    ap.add_argument("--requests", type=int, default=320, help="requests per backend and client count (320)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llamacpp (default: tiny random Phi-3, F16)")
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per llamacpp request (8)")
    ap.add_argument("--stream-requests", type=int, default=40, help="requests per row of table 2 (40)")
    ap.add_argument("--scale-requests", type=int, default=4, help="table 3: requests per client per row (4)")
    args = ap.parse_args()
    if 3 in args.tables:
        from _scale import scale_tables  # noqa: PLC0415 - table 3 alone needs llama-server

        with tempfile.TemporaryDirectory() as tmp:
            scale_tables(think_gguf(Path(tmp)), args.scale_requests, Path(tmp))
        if args.tables == [3]:
            return
    overhead, first_byte = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.backend:
            if 1 in args.tables:
                gguf = None if name == "fixed" else args.gguf or tiny_gguf(work)
                backend = FixedOutputBackend(REPLY) if gguf is None else LlamaCppBackend(gguf, n_ctx=1024)
                try:
                    overhead += bench(name, backend, args.clients, args.requests, args.max_tokens, work)
                finally:
                    backend.close()
            if 2 in args.tables:
                backend = paced_or_trained(name, work)
                try:
                    first_byte += streaming_bench(name, backend, args.stream_requests, 256, work)
                finally:
                    backend.close()
    if overhead:
        print_overhead(overhead)
    if first_byte:
        print_first_byte(first_byte)


if __name__ == "__main__":
    main()
