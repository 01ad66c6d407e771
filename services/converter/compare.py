"""Logit comparison between the HF reference and a GGUF, and the per-type pass/fail thresholds.

The max |logit difference| a correct file shows grows with the size of the logits (rounding is relative) and
with depth (each layer adds its rounding), so its floor is max(max_abs, rel_max_abs x largest |HF logit| x
sqrt(layers / 2)): the absolute floors are the issue's figures for the random-weight tiny Phi-3 (logits within
+-1.6, where they decide), the relative part takes over on trained and deeper models. Measured (llama-cpp-python
0.3.36), max |diff| and its ratio to the largest |HF logit|:

    model                           layers  largest |logit|   F16              Q8_0            Q4_K_M
    tiny, random weights            2       1.56              1.4e-3 (9e-4)    0.033 (0.021)   0.33 (0.21)
    tiny, trained 60 steps          2       18.0              9.3e-3 (5e-4)    0.125 (0.007)   1.12 (0.063)
    tiny, lm_head trained           2       32.3              1.1e-2 (3e-4)    0.35 (0.011)    3.08 (0.095)
    tiny, one reply then SFT        2       10.4              2.4e-2 (2.3e-3)  0.22 (0.021)    1.83 (0.18)
    Phi-3.5-mini, random weights    32      5.76              3.4e-2 (5.8e-3)  0.98 (0.17)     6.11 (1.06)

The last row is why the floor alone cannot judge a quantised file: a random-weight 32-layer model amplifies
rounding so much that Q8_0 costs KL 0.016 and Q4_K_M 0.53 (top-1 5%) although both files are right: the HF
model itself, given the Q8_0 file's own dequantised weights, moves by max |diff| 0.82 and KL 0.011. So every
bound adds noise_margin x that cost (`noise`, measured per file by services/converter/rounded.py); on the tiny
and trained models it is small and the floors decide. A broken file (a corrupted tensor, wrong rope) differs by
the size of the logits themselves, its KL is of order 1, and a wrong tensor also fails the weights check.

Top-1 agreement is only meaningful where the reference has a clear first choice: on a model with near-flat logits
any rounding flips it. So the gate counts *decisive* positions, where HF's best logit leads the second by more than
DECISIVE_MARGIN nats (the first choice is at least e times as likely), and a random-weight model simply has none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.converter.options import DEFAULT_THRESHOLDS, Thresholds

__all__ = ["DEFAULT_THRESHOLDS", "DECISIVE_MARGIN", "Thresholds", "compare", "failures"]

DECISIVE_MARGIN = 1.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Metrics of `got` against `ref` (both [positions, vocab]); computed in float64."""
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: HF {ref.shape}, GGUF {got.shape}")
    if not np.isfinite(got).all():
        bad = int((~np.isfinite(got)).any(axis=-1).sum())
        return {"finite": False, "nonfinite_positions": bad, "positions": int(ref.shape[0])}
    r, g = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g - r)
    lp, lq = _log_softmax(r), _log_softmax(g)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = r.argmax(-1) == g.argmax(-1)
    k = min(5, r.shape[-1])
    top5_r, top5_g = np.argpartition(-r, k - 1, axis=-1)[:, :k], np.argpartition(-g, k - 1, axis=-1)[:, :k]
    top5 = np.mean([len(set(a) & set(b)) / k for a, b in zip(top5_r, top5_g)])
    best2 = -np.partition(-r, 1, axis=-1)[:, :2]
    margin = best2[:, 0] - best2[:, 1]
    decisive = margin > DECISIVE_MARGIN
    return {
        "finite": True,
        "positions": int(r.shape[0]),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "kl_mean": float(max(kl.mean(), 0.0)),
        "kl_max": float(max(kl.max(), 0.0)),
        "top1": float(top1.mean()),
        "top5": float(top5),
        "decisive_positions": int(decisive.sum()),
        "top1_decisive": float(top1[decisive].mean()) if decisive.any() else None,
        "reference_margin_median": float(np.median(margin)),
        "reference_max_abs": float(np.abs(r).max()),
    }


def failures(m: dict[str, Any], bounds: dict[str, float]) -> list[str]:
    """Why the metrics `m` fail `bounds` (Thresholds.bounds; empty: they pass)."""
    if not m["finite"]:
        return [f"non-finite logits at {m['nonfinite_positions']} of {m['positions']} positions"]
    out = []
    if m["max_abs"] > bounds["max_abs"]:
        out.append(f"max |logit diff| {m['max_abs']:.4g} > {bounds['max_abs']:.4g}")
    if m["kl_mean"] > bounds["kl_mean"]:
        out.append(f"mean KL {m['kl_mean']:.4g} > {bounds['kl_mean']:.4g}")
    if m["top1_decisive"] is not None and m["top1_decisive"] < bounds["top1_decisive"]:
        out.append(
            f"top-1 agreement on {m['decisive_positions']} decisive positions "
            f"{m['top1_decisive']:.2%} < {bounds['top1_decisive']:.0%}"
        )
    return out
