"""`so8t`: one console entry with a subcommand per stage.

Every stage module exposes `add_arguments(parser)` and `run(args) -> int` in `services.<stage>.cli`, kept free
of heavy imports so `so8t --help` is instant; `python -m services.<stage>` runs the same code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from shared import logs
from shared.errors import StageError, write_failure

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "dataset": ("services.dataset.cli", "build /think SFT data from four-class JSONL records"),
    "train": ("services.trainer.cli", "QLoRA + SO(8) gates + PET training, resumable after power loss"),
    "bake": ("services.baker.cli", "merge LoRA, fold the rotations into o_proj, verify by reloading"),
    "convert": ("services.converter.cli", "GGUF F16 / Q8_0 / Q4_K_M with llama.cpp, each checked by running it"),
    "ollama": ("services.ollama.cli", "Modelfile, import into an Ollama server, /think smoke test"),
    "serve": ("services.think_api.cli", "the /think HTTP API (Ollama or in-process llama.cpp backend)"),
    "audit": ("services.think_api.audit.cli", "verify the think-API audit log's hash chain"),
    "eval": ("services.eval.cli", "evaluate models on dataset splits: /think format, label accuracy, gate, leaks"),
    "accept": ("services.acceptance.cli", "refuse models that failed the eval's acceptance policy (rule, figures)"),
    "pipeline": ("services.pipeline.cli", "run the whole chain natively, skipping stages that are up to date"),
    "stack": ("services.stack.cli", "container wrapper: wait for the upstream manifest, then run one stage"),
    "tiny-model": (
        "services.tiny_model.cli",
        "a tiny Phi-3 with a Phi-3 tokenizer: random, or pre-trained (the demo base)",
    ),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                out[name] = (module, help_)
        except ModuleNotFoundError:  # a stage package not installed in this image
            pass
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so8t", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _prog=f"so8t {name}")
    return parser


def run_stage(module: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry used by `python -m services.<stage>`: the same parser and run function as `so8t <stage>`."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog or module, description=(mod.__doc__ or "").strip().splitlines()[0])
    mod.add_arguments(parser)
    return _invoke(mod.run, parser.parse_args(argv), parser.prog)


def report(prog: str, err: StageError) -> str:
    """The error as the user reads it: what went wrong, then what became of the output."""
    lines = [f"{prog}: {err}"]
    if err.output is not None:
        out = Path(err.output)
        lines.append(f"the previous {out} is untouched" if out.exists() else f"nothing was written to {out}")
    return "\n".join(lines)


def _invoke(fn, args: argparse.Namespace, prog: str) -> int:
    logs.setup()
    try:
        return int(fn(args) or 0)
    except StageError as err:
        print(report(prog, err), file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a write outside a stage's build (status, smoke transcripts) that the disk refused
        disk = write_failure(err, err.filename or ".") if err.filename else None
        if disk is None:
            raise
        print(report(prog, disk), file=sys.stderr)
        return disk.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _invoke(args._run, args, args._prog)


if __name__ == "__main__":
    sys.exit(main())
