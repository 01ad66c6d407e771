"""The table printed at the end of a conversion (from manifest.json, so a skipped run prints the same)."""

from __future__ import annotations

from typing import Any


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(m: dict[str, Any]) -> str:
    cols = (
        f"{'type':<7} {'size MiB':>9} {'sha256':>12} {'weights':>8} {'max|Δ|':>9} {'bound':>8} {'mean|Δ|':>9} "
        f"{'KL':>9} {'bound':>8} {'own KL':>9} {'run KL':>9} {'top-1':>7} {'top-5':>7} {'decisive':>9} {'tokens':>7} "
        f"{'seconds':>8}"
    )
    lines = [cols]
    for qtype, rep in m["metrics"]["types"].items():
        o, lg, b = m["outputs"][qtype], rep["logits"], rep["bounds"]
        dec = f"{lg['decisive_positions']}:{pct(lg['top1_decisive'])}" if lg["decisive_positions"] else "0"
        lines.append(
            f"{qtype:<7} {o['bytes'] / 2**20:>9.2f} {o['sha256'][:12]:>12} {rep['weights']['worst_rel_rms']:>8.2g} "
            f"{lg['max_abs']:>9.3g} {b['max_abs']:>8.3g} {lg['mean_abs']:>9.3g} {lg['kl_mean']:>9.3g} "
            f"{b['kl_mean']:>8.3g} {rep['noise']['kl_mean']:>9.3g} {rep['runtime']['kl_mean']:>9.3g} "
            f"{pct(lg['top1']):>7} {pct(lg['top5']):>7} "
            f"{dec:>9} {'same' if rep['tokens']['match'] else 'DIFFER':>7} {rep['seconds']:>8.2f}"
        )
    r = m["metrics"]["reference"]
    lines.append(
        f"weights: worst relative RMS error of a tensor vs HF; logits: llama.cpp vs HF float32 on {r['positions']} "
        f"positions of the check conversation; own KL: what the file's rounded weights cost the HF model itself "
        f"(the bounds add {m['config']['noise_margin']:g}x it); run KL: llama.cpp against that model (the runtime "
        f"alone); decisive: HF's first choice leads by "
        f"> {m['config']['decisive_margin']} nat (count:top-1 there); tokens: llama.cpp ids vs HF ids of the same text"
    )
    for qtype, rep in m["metrics"]["types"].items():
        s = rep["smoke"]
        lines.append(
            f"{qtype} greedy ({s['tokens']} tokens, first {s['hf_prefix_match']}/{s['hf_tokens']} as HF's): "
            f"{s['text'][:80]!r}"
        )
    return "\n".join(lines)
