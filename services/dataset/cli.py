"""Build /think SFT data (train/val/rejects + manifest) from four-class JSONL records."""
from __future__ import annotations

import argparse
import sys

from shared.think_format import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="input JSONL file or glob (quote it); repeat for several")
    p.add_argument("--output", required=True, help="dataset directory (train.jsonl, val.jsonl, rejects.jsonl, manifest.json)")
    p.add_argument("--format", choices=FORMATS, default="simple",
                   help="assistant format: '# 思考ステップ / # 最終回答' (simple) or the four tags (quadruple)")
    p.add_argument("--val-ratio", type=float, default=0.05, help="validation share per label (default 0.05)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--min-quality", type=float, default=None,
                   help="drop records whose thinking scores below this (0-1); dropped lines go to rejects.jsonl")
    p.add_argument("--force", action="store_true", help="rebuild even when the manifest says it is up to date")


def _summary(result) -> str:
    m = result.metrics
    lines = [f"{'file':<48} {'read':>7} {'written':>8} {'dupes':>6} {'rejected':>8}"]
    for name, s in m["per_file"].items():
        lines.append(f"{name[-48:]:<48} {s['read']:>7} {s['written']:>8} {s['duplicates']:>6} {s['rejected']:>8}")
    lines.append(f"{'total':<48} {m['read']:>7} {m['written']:>8} {m['duplicates']:>6} {m['rejected']:>8}")
    lines.append(f"train {m['train']}  val {m['val']}  labels {m['per_label']}")
    if m["rejected"]:
        lines.append(f"rejected lines ({m['per_reason']}):")
        for r in result.rejects:
            lines.append(f"  {r['file']}:{r['line']}: {r['reason']}: {r['message']}")
        if m["rejected"] > len(result.rejects):
            lines.append(f"  … and {m['rejected'] - len(result.rejects)} more in {result.output / 'rejects.jsonl'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from services.dataset.build import DatasetOptions, InputError, build
    from shared.config import validate

    opts = validate(DatasetOptions, {"format": args.format, "val_ratio": args.val_ratio, "seed": args.seed,
                                     "min_quality": args.min_quality}, "command line")
    try:
        result = build(args.input, args.output, opts, force=args.force)
    except InputError as err:
        print(f"so8t dataset: {err}", file=sys.stderr)
        return 2
    if result.skipped:
        print(f"{result.output}: up to date (manifest matches inputs), skipped")
    else:
        print(_summary(result))
        print(f"written to {result.output}")
    return 0
