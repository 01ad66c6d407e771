"""GGUF F16 / Q8_0 / Q4_K_M with llama.cpp's own converter and quantiser, each checked by running it in llama.cpp."""
from __future__ import annotations

import argparse
import sys

from shared.layout import GGUF_TYPES


def _threshold(text: str) -> tuple[str, float]:
    qtype, sep, value = text.partition("=")
    if not sep or qtype not in GGUF_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TYPE=VALUE with TYPE one of {', '.join(GGUF_TYPES)}")
    try:
        return qtype, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="baked Hugging Face Phi-3 directory (so8t bake)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where <name>-<TYPE>.gguf and manifest.json go (files renamed in only once checked)")
    p.add_argument("--name", required=True, help="file name stem: <name>-F16.gguf, <name>-Q8_0.gguf, <name>-Q4_K_M.gguf")
    p.add_argument("--types", nargs="+", choices=GGUF_TYPES, default=list(GGUF_TYPES), metavar="TYPE",
                   help="any of F16 Q8_0 Q4_K_M (default: all; quantisations are made from the F16)")
    p.add_argument("--max-abs", action="append", type=_threshold, default=[], metavar="TYPE=VALUE",
                   help="floor of the bound on max |logit diff| vs HF float32 (defaults F16=5e-3 Q8_0=0.1 "
                        "Q4_K_M=0.6); repeatable")
    p.add_argument("--rel-max-abs", action="append", type=_threshold, default=[], metavar="TYPE=VALUE",
                   help="the bound is max(floor, VALUE x largest |HF logit|) (defaults F16=5e-3 Q8_0=0.05 "
                        "Q4_K_M=0.4); repeatable")
    p.add_argument("--max-kl", action="append", type=_threshold, default=[], metavar="TYPE=VALUE",
                   help="bound on the mean KL(HF || GGUF) (defaults F16=1e-3 Q8_0=1e-2 Q4_K_M=0.1); repeatable")
    p.add_argument("--strict-tokens", action="store_true",
                   help="fail when llama.cpp tokenises the check conversation differently from HF (default: warn)")
    p.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context for the checks (default 512, <= 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp and torch (default: all)")
    p.add_argument("--force", action="store_true", help="convert even when the manifest says it is up to date")


def options(args: argparse.Namespace):
    from services.converter.compare import DEFAULT_THRESHOLDS
    from services.converter.convert import ConvertOptions
    from shared.config import validate

    thresholds = {}
    for qtype in GGUF_TYPES:
        t = DEFAULT_THRESHOLDS[qtype].model_dump()
        t["max_abs"] = dict(args.max_abs).get(qtype, t["max_abs"])
        t["rel_max_abs"] = dict(args.rel_max_abs).get(qtype, t["rel_max_abs"])
        t["kl"] = dict(args.max_kl).get(qtype, t["kl"])
        thresholds[qtype] = t
    return validate(ConvertOptions, {"types": args.types, "thresholds": thresholds, "n_ctx": args.n_ctx,
                                     "threads": args.threads, "token_check": "fail" if args.strict_tokens else "warn"},
                    "command line")


def run(args: argparse.Namespace) -> int:
    from services.converter.convert import CheckFailed, convert
    from services.converter.hf_to_gguf import ConvertError
    from services.converter.report import table

    opts = options(args)
    try:
        result = convert(args.model, args.output_dir, args.name, opts, force=args.force)
    except ConvertError as err:
        print(f"so8t convert: {err}\nnothing was renamed into {args.output_dir}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"so8t convert: {err}\nthe previous outputs in {args.output_dir} are untouched", file=sys.stderr)
        return 1
    if result.skipped:
        print(f"{result.output}: up to date (manifest matches the model and config), skipped")
    print(table(result.manifest))
    print(f"written to {result.output}" if not result.skipped else f"files in {result.output}")
    return 0
