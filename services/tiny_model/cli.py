"""Save a tiny Phi-3 with a Phi-3 tokenizer: random (tests, benches), or pre-trained on a split (the demo's base)."""

from __future__ import annotations

import argparse

from services.tiny_model.options import TinyOptions
from shared import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    p.add_argument(
        "--pretrain-on",
        metavar="TRAIN_JSONL",
        default=None,
        help="pre-train every parameter on this split's text without the /think layout (the demo's "
        "base, services/tiny_model/pretrain.py); its lines also train the tokenizer",
    )
    flags.add(p, TinyOptions)
    p.add_argument("--force", action="store_true", help="build even when the manifest says it is up to date")


def run(args: argparse.Namespace) -> int:
    from services.tiny_model.build import build

    result = build(args.output, flags.parse(TinyOptions, args), args.pretrain_on, force=args.force)
    state = "up to date, skipped" if result.skipped else "written"
    print(f"tiny Phi-3 {state}: {result.output}")
    return 0
