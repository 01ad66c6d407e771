"""Refuse models that failed the eval's acceptance policy (eval.acceptance), naming the rule and the figures.

The chain runs it before the Ollama import (every GGUF it imports) and the native pipeline before serving; with
`acceptance: warn` in the profile it logs the failures and exits 0. The policy and the verdicts are the eval
stage's (services/eval/acceptance.py); this only reads its manifest.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-dir", required=True, help="the eval stage's directory (its manifest.json)")
    p.add_argument(
        "--model", action="append", required=True, help="a model name of the eval (e.g. Q4_K_M); repeat for several"
    )


def run(args: argparse.Namespace) -> int:
    from services.eval.acceptance import require

    require(args.eval_dir, args.model)
    return 0
