"""GGUF F16 / Q8_0 / Q4_K_M with llama.cpp's own converter and quantiser, each checked by running it in llama.cpp."""

from __future__ import annotations

import argparse

from services.converter.options import ConvertOptions
from shared import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="baked Hugging Face Phi-3 directory (so8t bake)")
    p.add_argument(
        "--output-dir",
        required=True,
        metavar="DIR",
        help="where <name>-<TYPE>.gguf and manifest.json go (replaced as a whole once every file passed)",
    )
    p.add_argument(
        "--name", required=True, help="file name stem: <name>-F16.gguf, <name>-Q8_0.gguf, <name>-Q4_K_M.gguf"
    )
    flags.add(p, ConvertOptions)
    p.add_argument("--force", action="store_true", help="convert even when the manifest says it is up to date")


def run(args: argparse.Namespace) -> int:
    from services.converter.convert import convert
    from services.converter.report import table

    result = convert(args.model, args.output_dir, args.name, flags.parse(ConvertOptions, args), force=args.force)
    if result.skipped:
        print(f"{result.output}: up to date (manifest matches the model and config), skipped")
    print(table(result.manifest))
    print(f"written to {result.output}" if not result.skipped else f"files in {result.output}")
    return 0
