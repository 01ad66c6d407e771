"""Evaluate models on dataset splits: /think format compliance, label accuracy, the gate's outcomes, leaks, chrF."""

from __future__ import annotations

import argparse

from services.eval.options import EvalOptions
from shared import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a split to ask, e.g. val=data/datasets/example/val.jsonl (the dataset stage's JSONL); repeat for several",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=][KIND:]WHERE",
        help="a model to evaluate: hf:DIR_OR_HUB_ID, gguf:FILE or ollama:TAG (a directory is hf, a "
        ".gguf file gguf); NAME labels it in the report; repeat for several",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="eval directory (replaced as a whole)")
    flags.add(p, EvalOptions)
    p.add_argument(
        "--acceptance",
        metavar="JSON",
        help="the acceptance policy each model is judged by (services/eval/acceptance.py), as a JSON object "
        'such as \'{"max_false_allow": 0.05, "on_fail": "warn"}\' or "warn"; default: its default limits',
    )
    p.add_argument("--force", action="store_true", help="evaluate even when the manifest says it is up to date")


def _policy(text: str | None):
    import json

    from services.eval.acceptance import AcceptancePolicy
    from shared.config import validate
    from shared.errors import InputError

    if text is None:
        return AcceptancePolicy()
    try:
        data = "warn" if text.strip() == "warn" else json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--acceptance: not JSON ({err})") from None
    return validate(AcceptancePolicy, data, "--acceptance")


def _splits(specs: list[str]) -> dict:
    from pathlib import Path

    from shared.errors import InputError

    out = {}
    for text in specs:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--split {text!r}: expected NAME=FILE")
        if name in out:
            raise InputError(f"--split {name} given twice")
        out[name] = Path(path)
    return out


def run(args: argparse.Namespace) -> int:
    from services.eval.models import ModelSpec
    from services.eval.run import evaluate

    models = [ModelSpec.parse(m) for m in args.model]
    opts = flags.parse(EvalOptions, args)
    result = evaluate(_splits(args.split), models, args.output, opts, force=args.force, policy=_policy(args.acceptance))
    print((result.output / "report.md").read_text(encoding="utf-8"))
    print(f"{'up to date, skipped: ' if result.skipped else ''}report, figure and transcripts in {result.output}")
    return 0
