"""/think smoke test of an imported model through the Ollama chat API (the Modelfile's template and system prompt).

Japanese and English prompts (the prototype's "What is 2+2?" among them) at temperature 0 with a fixed seed;
every reply goes through the shared parser and must come apart into thinking, then a verdict, then an answer,
with no chat-template token leaking. Transcripts go to `smoke.json` whether the test passes or not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ollama

from services.ollama.importer import host_of
from shared import atomic, logs
from shared.think_format import parse

log = logs.get("ollama")

PROMPTS: tuple[tuple[str, str], ...] = (
    ("ja", "2+2はいくつですか？"),
    ("en", "What is 2+2?"),
    ("ja", "日本の首都はどこですか？"),
    ("en", "Explain how photosynthesis works in one paragraph."),
)
OPTIONS: dict[str, Any] = {"temperature": 0.0, "seed": 42, "num_predict": 512}


def check(reply: str) -> dict[str, Any]:
    """Parse one reply; `passed` only when thinking and answer came apart in order and a verdict was given."""
    p = parse(reply)
    error = p.error if not p.ok else (None if p.label else "no verdict line (判定/Verdict) in the thinking")
    return {
        "passed": error is None,
        "error": error,
        "format": p.format,
        "label": p.label,
        "thinking": p.thinking,
        "final": p.final,
    }


def run_smoke(c: ollama.Client, model: str, output_dir: Path, prompts=PROMPTS, options=OPTIONS) -> dict[str, Any]:
    """Ask every prompt, write `<output_dir>/smoke.json`, return its content (`passed` is the verdict)."""
    results = []
    for lang, prompt in prompts:
        t0 = time.perf_counter()
        resp = c.chat(model=model, messages=[{"role": "user", "content": prompt}], options=options, stream=False)
        reply = resp.message.content or ""
        res = {
            "lang": lang,
            "prompt": prompt,
            "reply": reply,
            "seconds": round(time.perf_counter() - t0, 3),
            "done_reason": resp.done_reason,
            **check(reply),
        }
        log.info(
            "%s %r -> %s%s",
            "PASS" if res["passed"] else "FAIL",
            prompt,
            res["label"] or "-",
            "" if res["passed"] else f" ({res['error']})",
        )
        results.append(res)
    out = {
        "model": model,
        "host": host_of(c),
        "options": options,
        "passed": all(r["passed"] for r in results),
        "failed": [r["prompt"] for r in results if not r["passed"]],
        "results": results,
    }
    atomic.write_json(output_dir / "smoke.json", out)
    return out
