"""Ollama: write the Modelfile, import GGUFs into a server (tags per quantisation), run the /think smoke test."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import InputError, StageError
from shared.think_format import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    host_help = "Ollama server URL (default: $OLLAMA_HOST, else http://127.0.0.1:11434)"
    wait_help = "seconds to wait for the server to come up (default 120)"

    imp = sub.add_parser(
        "import",
        help="upload GGUFs and create name:<quant> models (e.g. so8t-think:q4_k_m)",
        description="Upload GGUFs to an Ollama server and create a model per quantisation.",
    )
    imp.add_argument("--gguf", nargs="+", required=True, type=Path, help="GGUF file(s) written by `so8t convert`")
    imp.add_argument(
        "--model",
        required=True,
        help="model name; the tag is the quantisation (name:f16, name:q8_0, name:q4_k_m) unless given "
        "as name:tag (one GGUF only)",
    )
    imp.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where Modelfile.<tag> and manifest.json go (default: <gguf dir>/../ollama)",
    )
    imp.add_argument("--format", choices=FORMATS, default="simple", help="the /think format the model was trained on")
    imp.add_argument("--host", default=None, help=host_help)
    imp.add_argument("--wait", type=float, default=120.0, help=wait_help)

    smk = sub.add_parser(
        "smoke",
        help="ask /think prompts at temperature 0 and check the format; writes smoke.json",
        description="Japanese and English /think prompts through the chat API, parsed by the "
        "shared parser; fails unless thinking and answer come apart cleanly.",
    )
    smk.add_argument("--model", required=True, help="name:tag of an imported model")
    smk.add_argument("--output", type=Path, required=True, help="directory for smoke.json")
    smk.add_argument("--host", default=None, help=host_help)
    smk.add_argument("--wait", type=float, default=120.0, help=wait_help)
    smk.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per reply (default 600)")

    mf = sub.add_parser(
        "modelfile",
        help="print or write the Modelfile of a GGUF (for `ollama create -f`)",
        description="The generated Modelfile: FROM the GGUF (relative to the Modelfile), the "
        "Phi-3.5 template, stop tokens, sampling parameters and the /think system prompt.",
    )
    mf.add_argument("--gguf", required=True, type=Path, help="the GGUF file")
    mf.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Modelfile path; FROM is then relative to it (default: print to stdout, FROM absolute)",
    )
    mf.add_argument("--format", choices=FORMATS, default="simple", help="the /think format the model was trained on")


def _import(args: argparse.Namespace) -> int:
    import time

    from services.ollama import importer

    if len(args.gguf) > 1 and ":" in args.model.rsplit("/", 1)[-1]:
        raise InputError("--model name:tag takes one GGUF; give a bare name to tag each by its quantisation")
    started = time.time()
    run_dir = args.run_dir or args.gguf[0].resolve().parent.parent / "ollama"
    c = importer.client(args.host)
    importer.wait_for_server(c, args.wait)
    done = [importer.import_gguf(c, g, args.model, run_dir, args.format, args.wait) for g in args.gguf]
    importer.record(run_dir, done, args.format, importer.host_of(c), started)
    for imp in done:
        print(f"{imp.model}: created from {imp.gguf} ({imp.digest}); Modelfile: {imp.modelfile}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import ollama

    from services.ollama import importer
    from services.ollama.smoke import run_smoke

    c = importer.client(args.host, timeout=args.timeout)
    importer.wait_for_server(c, args.wait)
    try:
        out = run_smoke(c, args.model, args.output)
    except ollama.ResponseError as err:
        raise StageError(f"{args.model} at {importer.host_of(c)}: HTTP {err.status_code}: {err.error}") from None
    for r in out["results"]:
        print(
            f"{'PASS' if r['passed'] else 'FAIL'}  [{r['lang']}] {r['prompt']}  label={r['label']}"
            + ("" if r["passed"] else f"  ({r['error']})")
        )
    print(f"transcripts: {args.output / 'smoke.json'}")
    if not out["passed"]:
        raise StageError(f"{len(out['failed'])} of {len(out['results'])} replies are not in the /think format")
    return 0


def _modelfile(args: argparse.Namespace) -> int:
    from services.ollama import modelfile
    from shared import atomic

    if not args.gguf.is_file():
        raise InputError(f"{args.gguf}: GGUF file not found")
    if args.output is None:
        sys.stdout.write(modelfile.render(str(args.gguf.resolve()), args.format))  # no known home: absolute
        return 0
    atomic.write_text(args.output, modelfile.render(modelfile.from_path(args.gguf, args.output.parent), args.format))
    print(f"Modelfile written to {args.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"import": _import, "smoke": _smoke, "modelfile": _modelfile}[args.action](args)
