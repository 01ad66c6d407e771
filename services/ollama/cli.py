"""Ollama: write the Modelfile, import GGUFs into a server (tags per quantisation), run the /think smoke test."""

from __future__ import annotations

import argparse
import sys

from services.ollama.options import ImportOptions, ModelfileOptions, SmokeOptions
from shared import flags
from shared.errors import InputError, StageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = sub.add_parser(
        "import",
        help="upload GGUFs and create name:<quant> models (e.g. so8t-think:q4_k_m)",
        description="Upload GGUFs to an Ollama server and create a model per quantisation.",
    )
    flags.add(imp, ImportOptions, ["gguf", "model", "run_dir", "format", "host", "wait"])
    smk = sub.add_parser(
        "smoke",
        help="ask /think prompts at temperature 0 and check the format; writes smoke.json",
        description="Japanese and English /think prompts through the chat API, parsed by the "
        "shared parser; fails unless thinking and answer come apart cleanly.",
    )
    flags.add(smk, SmokeOptions, ["model", "output", "host", "wait", "timeout"])
    mf = sub.add_parser(
        "modelfile",
        help="print or write the Modelfile of a GGUF (for `ollama create -f`)",
        description="The generated Modelfile: FROM the GGUF (relative to the Modelfile), the "
        "Phi-3.5 template, stop tokens, sampling parameters and the /think system prompt.",
    )
    flags.add(mf, ModelfileOptions)


def _import(args: argparse.Namespace) -> int:
    import time

    from services.ollama import importer

    o = flags.parse(ImportOptions, args)
    if len(o.gguf) > 1 and ":" in o.model.rsplit("/", 1)[-1]:
        raise InputError("--model name:tag takes one GGUF; give a bare name to tag each by its quantisation")
    started = time.time()
    run_dir = o.run_dir or o.gguf[0].resolve().parent.parent / "ollama"
    c = importer.client(o.host)
    importer.wait_for_server(c, o.wait)
    done = [importer.import_gguf(c, g, o.model, run_dir, o.format, o.wait) for g in o.gguf]
    importer.record(run_dir, done, o.format, importer.host_of(c), started)
    for imp in done:
        print(f"{imp.model}: created from {imp.gguf} ({imp.digest}); Modelfile: {imp.modelfile}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import ollama

    from services.ollama import importer
    from services.ollama.smoke import run_smoke

    o = flags.parse(SmokeOptions, args)
    c = importer.client(o.host, timeout=o.timeout)
    importer.wait_for_server(c, o.wait)
    try:
        out = run_smoke(c, o.model, o.output)
    except ollama.ResponseError as err:
        raise StageError(f"{o.model} at {importer.host_of(c)}: HTTP {err.status_code}: {err.error}") from None
    for r in out["results"]:
        print(
            f"{'PASS' if r['passed'] else 'FAIL'}  [{r['lang']}] {r['prompt']}  label={r['label']}"
            + ("" if r["passed"] else f"  ({r['error']})")
        )
    print(f"transcripts: {o.output / 'smoke.json'}")
    if not out["passed"]:
        raise StageError(f"{len(out['failed'])} of {len(out['results'])} replies are not in the /think format")
    return 0


def _modelfile(args: argparse.Namespace) -> int:
    from services.ollama import modelfile
    from shared import atomic

    o = flags.parse(ModelfileOptions, args)
    if not o.gguf.is_file():
        raise InputError(f"{o.gguf}: GGUF file not found")
    if o.output is None:
        sys.stdout.write(modelfile.render(str(o.gguf.resolve()), o.format))  # no known home: absolute
        return 0
    atomic.write_text(o.output, modelfile.render(modelfile.from_path(o.gguf, o.output.parent), o.format))
    print(f"Modelfile written to {o.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"import": _import, "smoke": _smoke, "modelfile": _modelfile}[args.action](args)
