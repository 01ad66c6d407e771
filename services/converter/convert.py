"""The converter stage: baked HF Phi-3 -> `<name>-F16.gguf`, `<name>-Q8_0.gguf`, `<name>-Q4_K_M.gguf`, each proven.

Steps (on the shared.stage contract): check the input -> skip when manifest.json matches the input hash and config
and the files are there -> in a staging directory beside the output: HF float32 reference logits and greedy tokens
-> F16 with convert_hf_to_gguf.py -> each quantisation from that F16 -> every file checked: header, tokenisation,
logits against HF, a greedy generation -> manifest.json, last -> the staging directory replaces the output.
A failure removes the staging directory and leaves the previous outputs and manifest untouched.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.converter import compare, header, hf_to_gguf, llama, quantize, reference, rounded
from services.converter.hf_to_gguf import ConvertError
from services.converter.options import REFERENCE_LAYERS, ConvertOptions
from shared import errors, logs, manifest, stage
from shared.layout import GGUF_TYPES, gguf_name
from shared.memory import available_ram

log = logs.get("convert")
STAGE = "convert"
CONVERTER_VERSION = 2  # 2: weights check and noise-widened logit bounds
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # the pipeline's convert.name pattern, no leading '.'

__all__ = ["CheckFailed", "ConvertError", "ConvertOptions", "check_file", "convert", "gguf_files", "stage_config"]


class CheckFailed(errors.CheckFailed):
    """A produced GGUF failed its checks; `report` holds every number measured up to the failure."""

    def __init__(self, qtype: str, reasons: list[str], report: dict[str, Any]):
        super().__init__(f"{qtype} GGUF failed its checks:\n  " + "\n  ".join(reasons), report)
        self.qtype, self.reasons = qtype, reasons


def gguf_files(result: stage.StageResult) -> dict[str, Path]:
    """{type: path} of the GGUFs a conversion wrote."""
    return {t: result.output / o["file"] for t, o in result.manifest["outputs"].items()}


def stage_config(name: str, opts: ConvertOptions) -> dict[str, Any]:
    """Everything that decides the outputs and their verdicts (the manifest's config, hashed for the skip)."""
    return {
        "name": name,
        "gguf_general_name": hf_to_gguf.gguf_model_name(name),
        **opts.model_dump(mode="json", exclude={"threads", "thresholds"}),
        "thresholds": {t: opts.threshold(t).model_dump() for t in opts.types},
        "reference_layers": REFERENCE_LAYERS,
        "decisive_margin": compare.DECISIVE_MARGIN,
        "check_prompt_sha256": reference.prompt_digest(),
        "converter_version": CONVERTER_VERSION,
        "llama_cpp_python": hf_to_gguf.llama_cpp_version(),
    }


def check_file(
    path: Path, qtype: str, ref: reference.Reference, expected: header.Expected, opts: ConvertOptions
) -> dict[str, Any]:
    """Header, tokenisation, logits and greedy smoke of one GGUF; raises CheckFailed with the numbers."""
    t0 = time.time()
    h = header.read_header(path)
    report: dict[str, Any] = {"header": header.summary(h)}
    problems = header.check_header(h, expected, qtype)
    if problems:
        raise CheckFailed(qtype, problems, report)
    limits = opts.threshold(qtype)
    own = rounded.compute(path, ref, opts.threads)  # before llama.cpp loads the file: one model in memory at a time
    report["weights"] = own.summary()
    report["noise"] = compare.compare(ref.logits, own.logits)
    problems = weight_problems(own, limits.weight_rel_rms)
    if not problems and not report["noise"]["finite"]:
        problems = ["the HF model given the file's dequantised weights computes non-finite logits"]
    if problems:
        raise CheckFailed(qtype, problems, report)
    n_ctx = max(opts.n_ctx, len(ref.text_ids), len(ref.prompt_ids) + opts.smoke_tokens)
    try:
        llm = llama.open_model(path, n_ctx=n_ctx, threads=opts.threads)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise CheckFailed(qtype, [f"llama.cpp cannot load it: {e} (its log above says why)"], report) from e
    try:
        ids = {
            "check": llama.tokenize(llm, reference.check_text()),
            "prompt": llama.tokenize(llm, reference.prompt_text()),
        }
        report["tokens"] = token_report(ref, ids["check"], ids["prompt"])
        got = llama.logits(llm, ref.text_ids)  # HF's ids on both sides: the logits compare the models alone
        lg = report["logits"] = compare.compare(ref.logits, got)
        report["runtime"] = compare.compare(own.logits, got)  # llama.cpp vs HF on the same weights: the runtime alone
        if lg["finite"]:
            report["bounds"] = limits.bounds(lg["reference_max_abs"], ref.layers, report["noise"], opts.noise_margin)
        reasons = compare.failures(lg, report.get("bounds", {}))
        if not report["tokens"]["match"]:
            msg = (
                f"tokenisation differs from HF at position {report['tokens']['first_difference']} "
                f"({report['tokens']['hf_count']} HF ids, {report['tokens']['llama_count']} llama.cpp ids)"
            )
            if opts.token_check == "fail":
                reasons.append(msg)
            else:
                log.warning("%s: %s", qtype, msg)
        if reasons:
            raise CheckFailed(qtype, reasons, report)
        gen = llama.greedy(llm, ref.prompt_ids, opts.smoke_tokens, ref.stop_ids)
        report["smoke"] = {
            "tokens": len(gen),
            "text": llama.detokenize(llm, gen),
            "hf_prefix_match": _common_prefix(gen, ref.greedy_ids),
            "hf_tokens": len(ref.greedy_ids),
        }
    finally:
        llm.close()
    report["check_seconds"] = round(time.time() - t0, 3)
    return report


def weight_problems(own: rounded.Rounded, bound: float, show: int = 5) -> list[str]:
    """Missing tensors, then those whose error exceeds `bound` (NaN included), worst first; at most `show` named."""
    bad = [(e, n) for n, e in own.errors.items() if not e <= bound]
    bad.sort(key=lambda en: -np.nan_to_num(en[0], nan=np.inf))
    out = own.problems + [f"{n}: relative RMS error {e:.3g} against the HF weights > {bound:g}" for e, n in bad]
    return out[:show] + ([f"... and {len(out) - show} more"] if len(out) > show else [])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_report(ref: reference.Reference, llama_check: list[int], llama_prompt: list[int]) -> dict[str, Any]:
    """HF vs llama.cpp ids of the check conversation (and of the generation prompt)."""
    hf = ref.text_ids
    first = _common_prefix(hf, llama_check)
    match = hf == llama_check and ref.prompt_ids == llama_prompt
    return {
        "match": match,
        "hf_count": len(hf),
        "llama_count": len(llama_check),
        "first_difference": None if match else first,
        "hf_ids_near": None if match else hf[max(0, first - 3) : first + 5],
        "llama_ids_near": None if match else llama_check[max(0, first - 3) : first + 5],
    }


def convert(
    model_dir: str | Path, output_dir: str | Path, name: str, options: ConvertOptions | None = None, force: bool = False
) -> stage.StageResult:
    """Convert, quantise and check; see the module docstring. Raises ConvertError or CheckFailed."""
    started = time.time()
    model_dir = Path(model_dir)
    opts = options or ConvertOptions()
    for t in opts.types:
        gguf_name(name, t)  # validates the type
    if not NAME_RE.fullmatch(name):
        raise ConvertError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it becomes the file name)")
    hf_to_gguf.check_model_dir(model_dir)
    hf_to_gguf.converter_script()
    spec = stage.Spec(STAGE, Path(output_dir), {"model": stage.verified_input(model_dir)}, stage_config(name, opts))
    if force or spec.current() is None:  # a conversion will run (a skip needs no disk or RAM): can it finish?
        values = hf_to_gguf.parameter_count(model_dir)
        check_space(values, spec.output, opts.types)
        check_ram(values)
    return stage.run(spec, lambda tmp: _write(model_dir, tmp, name, opts), force, started)


# file size per value: F16 2 bytes; Q8_0 34 bytes per 32 values; Q4_K_M (Q4_K with some Q6_K) measured 0.63 byte
BYTES_PER_VALUE = {"F16": 2.0, "Q8_0": 34 / 32, "Q4_K_M": 0.63}


def check_space(values: int, output_dir: Path, types: Sequence[str]) -> None:
    """Refuse at once when the output's file system cannot hold the files (the F16 is always made), instead of
    llama.cpp's 'iostream error' minutes later. The staging directory sits beside the output, on the same disk."""
    need = {t: values * BYTES_PER_VALUE[t] for t in GGUF_TYPES if t == "F16" or t in types}
    where = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < 1.02 * sum(need.values()):
        parts = ", ".join(f"{t} {_size(b)}" for t, b in need.items())
        raise ConvertError(
            f"{where}: No space left on device for the GGUFs: {_size(free)} free, about {_size(sum(need.values()))} "
            f"needed ({parts}); free some space or choose another --output-dir (the previous outputs stay until "
            "replaced)"
        )


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


REFERENCE_SLACK = 2 << 30  # beyond the float32 weights: torch, the tokenizer, the logits, a dequantised tensor


def check_ram(values: int) -> None:
    """The checks run the HF model in float32 on the CPU (15.3 GB for Phi-3.5-mini): refuse at once when this
    process may not use that much, instead of an OOM kill that a restart policy would repeat."""
    need, have = 4 * values + REFERENCE_SLACK, available_ram()
    if need > have:
        raise ConvertError(
            f"the checks run the model in float32 on the CPU: {need / 2**30:.1f} GiB of RAM needed, this process may "
            f"use {have / 2**30:.1f} GiB; give it more memory (close other programs, or raise the container's memory "
            "limit) or convert on a bigger machine; nothing was written"
        )


def _write(model_dir: Path, out: Path, name: str, opts: ConvertOptions) -> stage.Built:
    """Every chosen GGUF into `out`, each checked; an F16 made only as the quantisations' source is removed."""
    log.info("HF reference: %s in float32", model_dir)
    ref = reference.compute(model_dir, opts.smoke_tokens, opts.threads)
    expected = header.Expected.from_model_dir(model_dir)
    files = {t: out / gguf_name(name, t) for t in GGUF_TYPES if t == "F16" or t in opts.types}
    reports: dict[str, dict[str, Any]] = {}
    for qtype in logs.progress(list(files), desc="convert", unit="file"):
        t0 = time.time()
        if qtype == "F16":
            hf_to_gguf.convert_f16(model_dir, files[qtype], name)
        else:
            quantize.quantize(files["F16"], files[qtype], qtype, opts.threads)
        made = time.time() - t0
        if qtype not in opts.types:
            continue  # an F16 made only as the quantisation source: its quantisations are checked
        rep = check_file(files[qtype], qtype, ref, expected, opts)
        rep["produce_seconds"] = round(made, 3)
        rep["seconds"] = round(made + rep["check_seconds"], 3)
        reports[qtype] = rep
        lg = rep["logits"]
        log.info(
            "%s ok: weights within %.3g, max|Δ| %.3g (bound %.3g), mean|Δ| %.3g, KL %.3g (bound %.3g; HF on the "
            "file's weights %.3g, llama.cpp vs that %.3g), top-1 %.0f%%, %d decisive, %.1f s",
            qtype,
            rep["weights"]["worst_rel_rms"],
            lg["max_abs"],
            rep["bounds"]["max_abs"],
            lg["mean_abs"],
            lg["kl_mean"],
            rep["bounds"]["kl_mean"],
            rep["noise"]["kl_mean"],
            rep["runtime"]["kl_mean"],
            100 * lg["top1"],
            lg["decisive_positions"],
            rep["seconds"],
        )
    if "F16" not in opts.types:
        files.pop("F16").unlink()
    outputs: dict[str, Any] = {
        t: {"file": p.name, "bytes": p.stat().st_size, "sha256": manifest.sha256_file(p)} for t, p in files.items()
    }
    metrics = {
        "reference": {
            "dtype": "float32",
            "layers": ref.layers,
            "positions": len(ref.text_ids),
            "prompt_tokens": len(ref.prompt_ids),
            "greedy_tokens": len(ref.greedy_ids),
            "greedy_text": ref.greedy_text,
            "seconds": round(ref.seconds, 3),
        },
        "types": reports,
    }
    return stage.Built(metrics, outputs)
