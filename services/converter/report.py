"""The table printed at the end of a conversion (from manifest.json, so a skipped run prints the same)."""

from __future__ import annotations

from typing import Any


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(m: dict[str, Any]) -> str:
    cols = (
        f"{'type':<7} {'size MiB':>9} {'sha256':>12} {'max|Δ|':>9} {'bound':>8} {'mean|Δ|':>9} {'top-1':>7} "
        f"{'top-5':>7} {'KL':>9} {'decisive':>9} {'tokens':>7} {'seconds':>8}"
    )
    lines = [cols]
    for qtype, rep in m["metrics"]["types"].items():
        o, lg = m["outputs"][qtype], rep["logits"]
        dec = f"{lg['decisive_positions']}:{pct(lg['top1_decisive'])}" if lg["decisive_positions"] else "0"
        lines.append(
            f"{qtype:<7} {o['bytes'] / 2**20:>9.2f} {o['sha256'][:12]:>12} {lg['max_abs']:>9.3g} "
            f"{rep['max_abs_bound']:>8.3g} {lg['mean_abs']:>9.3g} "
            f"{pct(lg['top1']):>7} {pct(lg['top5']):>7} {lg['kl_mean']:>9.3g} {dec:>9} "
            f"{'same' if rep['tokens']['match'] else 'DIFFER':>7} {rep['seconds']:>8.2f}"
        )
    r = m["metrics"]["reference"]
    lines.append(
        f"logits vs HF float32 on {r['positions']} positions of the check conversation; decisive: HF's first "
        f"choice leads by > {m['config']['decisive_margin']} nat (count:top-1 there); tokens: llama.cpp ids "
        f"vs HF ids of the same text"
    )
    for qtype, rep in m["metrics"]["types"].items():
        s = rep["smoke"]
        lines.append(
            f"{qtype} greedy ({s['tokens']} tokens, first {s['hf_prefix_match']}/{s['hf_tokens']} as HF's): "
            f"{s['text'][:80]!r}"
        )
    return "\n".join(lines)
