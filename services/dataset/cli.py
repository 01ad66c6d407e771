"""Build /think SFT data (train/val/rejects + manifest) from four-class JSONL records."""

from __future__ import annotations

import argparse
import itertools
import json

from services.dataset.options import DatasetOptions
from shared import flags

SHOWN_REJECTS = 100  # rejected lines listed on the console; all of them are in rejects.jsonl


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="GLOB",
        help="input JSONL file or glob (quote it); repeat for several",
    )
    p.add_argument(
        "--output", required=True, help="dataset directory (train.jsonl, val.jsonl, rejects.jsonl, manifest.json)"
    )
    flags.add(p, DatasetOptions)
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
        with open(result.output / "rejects.jsonl", encoding="utf-8") as fh:
            for r in map(json.loads, itertools.islice(fh, SHOWN_REJECTS)):
                lines.append(f"  {r['file']}:{r['line']}: {r['reason']}: {r['message']}")
        if m["rejected"] > SHOWN_REJECTS:
            lines.append(f"  … and {m['rejected'] - SHOWN_REJECTS} more in {result.output / 'rejects.jsonl'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from services.dataset.build import build

    result = build(args.input, args.output, flags.parse(DatasetOptions, args), force=args.force)
    if result.skipped:
        print(f"{result.output}: up to date (manifest matches inputs), skipped")
    else:
        print(_summary(result))
        print(f"written to {result.output}")
    return 0
