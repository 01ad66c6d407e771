"""The converter stage: baked HF Phi-3 -> `<name>-F16.gguf`, `<name>-Q8_0.gguf`, `<name>-Q4_K_M.gguf`, each proven.

Steps: check the input -> skip when manifest.json matches the input hash and config (and the files are there) ->
HF float32 reference logits and greedy tokens -> F16 with convert_hf_to_gguf.py -> each quantisation from that F16
-> every file, under a temp name in the output directory, is checked: header, tokenisation, logits against HF, a
greedy generation -> only when all pass are they renamed into place, then manifest.json is written, last.
A failure removes the temp files and leaves the previous outputs and manifest untouched.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from services.converter import compare, header, hf_to_gguf, llama, quantize, reference
from services.converter.compare import DEFAULT_THRESHOLDS, Thresholds
from services.converter.hf_to_gguf import ConvertError
from shared import atomic, logs, manifest
from shared.config import StrictModel, config_hash
from shared.layout import GGUF_TYPES, GgufType, gguf_name

log = logs.get("convert")
STAGE = "convert"
CONVERTER_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # the pipeline's convert.name pattern, no leading '.'


class ConvertOptions(StrictModel):
    types: list[GgufType] = Field(default_factory=lambda: list(GGUF_TYPES), min_length=1)
    # per-type bounds; types left out keep DEFAULT_THRESHOLDS
    thresholds: dict[GgufType, Thresholds] = Field(default_factory=dict)
    n_ctx: int = Field(llama.DEFAULT_CTX, ge=64, le=4096)  # <= Phi-3's original context: see llama.py
    smoke_tokens: int = Field(16, ge=1, le=256)
    # HF vs llama.cpp token ids of the check conversation: "fail" makes a difference fatal, "warn" only reports it
    token_check: Literal["fail", "warn"] = "warn"
    threads: int | None = Field(None, ge=1)  # not part of the config hash: it changes no output

    @field_validator("types")
    @classmethod
    def _ordered_unique(cls, v: list[str]) -> list[str]:
        return [t for t in GGUF_TYPES if t in v]

    def threshold(self, qtype: str) -> Thresholds:
        return self.thresholds.get(qtype) or DEFAULT_THRESHOLDS[qtype]  # type: ignore[index]


class CheckFailed(RuntimeError):
    """A produced GGUF failed its checks; `report` holds every number measured up to the failure."""

    def __init__(self, qtype: str, reasons: list[str], report: dict[str, Any]):
        super().__init__(f"{qtype} GGUF failed its checks:\n  " + "\n  ".join(reasons))
        self.qtype, self.reasons, self.report = qtype, reasons, report


@dataclass
class Result:
    skipped: bool
    output: Path
    manifest: dict[str, Any]
    files: dict[str, Path]


def stage_config(name: str, opts: ConvertOptions) -> dict[str, Any]:
    """Everything that decides the outputs and their verdicts (the manifest's config, hashed for the skip)."""
    return {
        "name": name,
        "gguf_general_name": hf_to_gguf.gguf_model_name(name),
        **opts.model_dump(mode="json", exclude={"threads", "thresholds"}),
        "thresholds": {t: opts.threshold(t).model_dump() for t in opts.types},
        "decisive_margin": compare.DECISIVE_MARGIN,
        "check_prompt_sha256": reference.prompt_digest(),
        "converter_version": CONVERTER_VERSION,
        "llama_cpp_python": hf_to_gguf.llama_cpp_version(),
    }


def _outputs_intact(out: Path, m: dict[str, Any] | None) -> bool:
    if not m:
        return False
    files = m.get("outputs", {})
    return bool(files) and all((out / f["file"]).is_file() and (out / f["file"]).stat().st_size == f["bytes"]
                               for f in files.values())


def check_file(path: Path, qtype: str, ref: reference.Reference, expected: header.Expected,
               opts: ConvertOptions) -> dict[str, Any]:
    """Header, tokenisation, logits and greedy smoke of one GGUF; raises CheckFailed with the numbers."""
    t0 = time.time()
    h = header.read_header(path)
    report: dict[str, Any] = {"header": header.summary(h)}
    problems = header.check_header(h, expected, qtype)
    if problems:
        raise CheckFailed(qtype, problems, report)
    llm = llama.open_model(path, n_ctx=max(opts.n_ctx, len(ref.text_ids), len(ref.prompt_ids) + opts.smoke_tokens),
                           threads=opts.threads)
    try:
        ids = {"check": llama.tokenize(llm, reference.check_text()), "prompt": llama.tokenize(llm, reference.prompt_text())}
        report["tokens"] = token_report(ref, ids["check"], ids["prompt"])
        got = llama.logits(llm, ref.text_ids)  # HF's ids on both sides: the logits compare the models alone
        report["logits"] = compare.compare(ref.logits, got)
        if report["logits"]["finite"]:
            report["max_abs_bound"] = opts.threshold(qtype).max_abs_bound(report["logits"]["reference_max_abs"])
        reasons = compare.failures(report["logits"], opts.threshold(qtype))
        if not report["tokens"]["match"]:
            msg = (f"tokenisation differs from HF at position {report['tokens']['first_difference']} "
                   f"({report['tokens']['hf_count']} HF ids, {report['tokens']['llama_count']} llama.cpp ids)")
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
    return {"match": match, "hf_count": len(hf), "llama_count": len(llama_check),
            "first_difference": None if match else first,
            "hf_ids_near": None if match else hf[max(0, first - 3): first + 5],
            "llama_ids_near": None if match else llama_check[max(0, first - 3): first + 5]}


def convert(model_dir: str | Path, output_dir: str | Path, name: str, options: ConvertOptions | None = None,
            force: bool = False) -> Result:
    """Convert, quantise and check; see the module docstring. Raises ConvertError or CheckFailed."""
    started = time.time()
    model_dir, out = Path(model_dir), Path(output_dir)
    opts = options or ConvertOptions()
    for t in opts.types:
        gguf_name(name, t)  # validates the type
    if not NAME_RE.fullmatch(name):
        raise ConvertError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it becomes the file name)")
    hf_to_gguf.check_model_dir(model_dir)
    hf_to_gguf.converter_script()
    config = stage_config(name, opts)
    chash = config_hash(config)
    inputs = {"model": manifest.describe_input(model_dir)}
    previous = manifest.read(out)
    if not force and manifest.is_up_to_date(out, STAGE, inputs, chash) and _outputs_intact(out, previous):
        log.info("%s: up to date (model hash and config match manifest.json), skipped", out)
        files = {t: out / f["file"] for t, f in previous["outputs"].items()}  # type: ignore[index]
        return Result(True, out, previous, files)  # type: ignore[arg-type]

    out.mkdir(parents=True, exist_ok=True)
    for p in atomic.remove_stale_temps(out):
        log.info("removed %s (left by an interrupted run)", p.name)
    log.info("HF reference: %s in float32", model_dir)
    ref = reference.compute(model_dir, opts.smoke_tokens, opts.threads)
    expected = header.Expected.from_model_dir(model_dir)
    temps = {t: atomic.temp_file(out / gguf_name(name, t)) for t in GGUF_TYPES if t == "F16" or t in opts.types}
    reports: dict[str, dict[str, Any]] = {}
    try:
        for qtype in logs.progress(list(temps), desc="convert", unit="file"):
            t0 = time.time()
            if qtype == "F16":
                hf_to_gguf.convert_f16(model_dir, temps[qtype], name)
            else:
                quantize.quantize(temps["F16"], temps[qtype], qtype, opts.threads)
            made = time.time() - t0
            if qtype not in opts.types:
                continue  # an F16 made only as the quantisation source: its quantisations are checked
            rep = check_file(temps[qtype], qtype, ref, expected, opts)
            rep["produce_seconds"] = round(made, 3)
            rep["seconds"] = round(made + rep["check_seconds"], 3)
            reports[qtype] = rep
            lg = rep["logits"]
            log.info("%s ok: max|Δ| %.3g, mean|Δ| %.3g, KL %.3g, top-1 %.0f%%, %d decisive, %.1f s", qtype,
                     lg["max_abs"], lg["mean_abs"], lg["kl_mean"], 100 * lg["top1"], lg["decisive_positions"],
                     rep["seconds"])
        outputs = {}
        for qtype in opts.types:
            atomic.fsync_path(temps[qtype])
            final = gguf_name(name, qtype)
            outputs[qtype] = {"file": final, "bytes": temps[qtype].stat().st_size,
                              "sha256": manifest.sha256_file(temps[qtype])}
        # all checked: the old manifest goes first, so a crash among the renames leaves no manifest (a rerun)
        with contextlib.suppress(FileNotFoundError):
            (out / manifest.MANIFEST).unlink()
        for qtype in opts.types:
            os.replace(temps.pop(qtype), out / outputs[qtype]["file"])
        for qtype in GGUF_TYPES:
            stale = out / gguf_name(name, qtype)
            if qtype not in opts.types and stale.exists():
                log.info("removing %s: not among --types, it would not match the new manifest", stale.name)
                stale.unlink()
        atomic.fsync_path(out)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    metrics = {
        "reference": {"dtype": "float32", "positions": len(ref.text_ids), "prompt_tokens": len(ref.prompt_ids),
                      "greedy_tokens": len(ref.greedy_ids), "greedy_text": ref.greedy_text,
                      "seconds": round(ref.seconds, 3)},
        "types": reports,
    }
    m = manifest.build(STAGE, inputs, config, chash, started, metrics, outputs)
    manifest.write(out, m)
    return Result(False, out, m, {t: out / o["file"] for t, o in outputs.items()})
