"""Save a tiny random-weight Phi-3 with a Phi-3-style tokenizer (for tests, demos and benchmarks)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 256 (default 256)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=int, default=512, help="MLP width (default 512)")


def run(args: argparse.Namespace) -> int:
    from shared import logs
    from shared.tiny import build_tiny_model

    if args.hidden % 256:
        print(f"--hidden {args.hidden}: must be a multiple of 256 (K-quants work on 256-wide blocks)", file=sys.stderr)
        return 2
    out = build_tiny_model(
        args.output,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
    )
    logs.get("tiny-model").info("tiny Phi-3 written to %s", out)
    print(out)
    return 0


if __name__ == "__main__":
    from services.cli import run_stage

    sys.exit(run_stage("services.tiny_model", prog="python -m services.tiny_model"))
