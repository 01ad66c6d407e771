"""The converter's figures on the tiny Phi-3: size, logit error vs HF float32, agreement and time per GGUF type.

    python bench/converter_figures.py [--threads N] [--steps 30] [--keep DIR]

Builds the random-weight tiny Phi-3 (shared/tiny.py) and a copy trained on the converter's check conversation
until HF's first choice is clear (the decoder layers and the output rows of that text's tokens, --steps AdamW
steps, as tests/test_converter.py does), converts both with `services.converter.convert` (llama.cpp's converter
and quantiser, every file checked) and prints one markdown table from the two manifests. "decisive" counts the
positions where HF's first choice leads the second by more than compare.DECISIVE_MARGIN nats; top-1 there is the
agreement the converter enforces (a random model has near-flat logits, so no decisive position). "produce" is
convert_hf_to_gguf.py for F16 and llama_model_quantize for the others; "check" is header, tokenisation, logits
and greedy smoke in llama.cpp. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.converter import reference  # noqa: E402
from services.converter.compare import DECISIVE_MARGIN  # noqa: E402
from services.converter.convert import ConvertOptions, convert  # noqa: E402
from services.converter.report import pct  # noqa: E402
from shared.tiny import build_tiny_model, teach  # noqa: E402


def train_tiny(src: Path, dst: Path, steps: int = 30) -> Path:
    """The tiny Phi-3 at `src` trained on reference.check_text() (as tests/test_converter.py does)."""
    from transformers import AutoTokenizer

    return teach(src, dst, reference.hf_ids(AutoTokenizer.from_pretrained(src), reference.check_text()), steps=steps)


def rows(label: str, m: dict) -> list[str]:
    out = []
    for qtype, rep in m["metrics"]["types"].items():
        lg, o = rep["logits"], m["outputs"][qtype]
        dec = f"{lg['decisive_positions']}: {pct(lg['top1_decisive'])}" if lg["decisive_positions"] else "0: n/a"
        out.append(
            f"| {label} | {qtype} | {o['bytes'] / 2**20:.2f} | {rep['weights']['worst_rel_rms']:.2g} "
            f"| {lg['max_abs']:.3g} | {rep['bounds']['max_abs']:.3g} | {lg['mean_abs']:.3g} | {lg['kl_mean']:.3g} "
            f"| {rep['noise']['kl_mean']:.3g} | {rep['runtime']['kl_mean']:.3g} "
            f"| {pct(lg['top1'])} | {pct(lg['top5'])} | {dec} "
            f"| {rep['produce_seconds']:.2f} | {rep['check_seconds']:.2f} |"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="AdamW steps for the trained variant (default 30)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("SO8T_PROGRESS", "0")
    work = args.keep or Path(tempfile.mkdtemp(prefix="so8t-converter-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        random_dir = build_tiny_model(work / "random")
        build_s = time.time() - t0
        t0 = time.time()
        trained_dir = train_tiny(random_dir, work / "trained", args.steps)
        train_s = time.time() - t0
        opts = ConvertOptions(threads=args.threads)
        results = {
            label: convert(d, work / f"gguf-{label}", "tiny", opts, force=True)
            for label, d in (("random", random_dir), (f"trained {args.steps} steps", trained_dir))
        }
        print(
            f"tiny Phi-3 (hidden 256, 2 layers, vocab 32064): built in {build_s:.1f} s, trained in {train_s:.1f} s; "
            f"threads {args.threads or os.cpu_count()}\n"
        )
        print(
            "| model | type | size MiB | weights | max\\|Δ\\| | bound | mean\\|Δ\\| | KL | own KL | run KL | top-1 "
            "| top-5 | decisive: top-1 | produce s | check s |"
        )
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for label, res in results.items():
            print("\n".join(rows(label, res.manifest)))
        print()
        for label, res in results.items():
            r = res.manifest["metrics"]["reference"]
            lg = res.manifest["metrics"]["types"]["F16"]["logits"]
            print(
                f"{label}: {r['positions']} positions, largest |HF logit| {lg['reference_max_abs']:.3g}, "
                f"median top-1 margin {lg['reference_margin_median']:.3g} nat (decisive: > {DECISIVE_MARGIN}), "
                f"HF float32 reference {r['seconds']:.1f} s, whole conversion {res.manifest['seconds']:.1f} s"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
