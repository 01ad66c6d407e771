"""The eval stage: every model answers every record of every split; the figures side by side (shared.stage contract).

Outputs in the eval directory: `transcripts-<model>.jsonl` (split, record, prompt, reply, parse and gate result,
label), `report.md` (the table), `report.png` (confusion matrices and bars) and `manifest.json` (every figure, the
splits and models with their hashes). A model that fails (a GGUF that does not load, a server that is gone) is
recorded with its error and the others' results are kept; the stage then exits non-zero naming it, and the next
run evaluates again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from services.eval import metrics, report
from services.eval import records as recs
from services.eval.models import ModelSpec, open_generator
from services.eval.options import EvalOptions
from shared import logs, manifest, stage
from shared.errors import InputError, StageError

log = logs.get("eval")
STAGE = "eval"
EVAL_VERSION = 1


def describe_model(spec: ModelSpec) -> dict[str, Any]:
    if spec.kind == "ollama":
        return {"path": spec.where, "kind": "ollama", "sha256": _ollama_digest(spec.where)}
    if Path(spec.where).exists():  # checked against the manifest of the stage that wrote it: never a corrupt file
        return stage.verified_input(spec.where)
    return {"path": spec.where, "kind": "hub", "sha256": None}  # a hub id: its name (in the config) decides


def _ollama_digest(tag: str) -> str | None:
    from services.ollama import importer

    try:
        for m in importer.client(timeout=10).list().models:
            if m.model == tag or m.model == f"{tag}:latest":
                return str(m.digest)
    except Exception:  # the server is down: generation will say so, naming the tag
        return None
    return None


def evaluate(
    splits: dict[str, Path], models: list[ModelSpec], output: str | Path, opts: EvalOptions, force: bool = False
) -> stage.StageResult:
    """Evaluate `models` on `splits` into `output`; skipped when the manifest matches and nothing failed."""
    started = time.time()
    if not splits or not models:
        raise InputError("give at least one --split NAME=FILE and one --model")
    if len({m.name for m in models}) != len(models):
        raise InputError(f"model names must differ: {[m.name for m in models]}")
    unknown = set(opts.max_records) - set(splits)
    if unknown:
        raise InputError(f"max_records names split(s) {sorted(unknown)} that are not among {sorted(splits)}")
    data = {name: recs.load(path, opts.max_records.get(name), opts.seed, name) for name, path in splits.items()}
    inputs = {f"split:{n}": manifest.describe_input(p) for n, p in splits.items()}
    inputs |= {f"model:{m.name}": describe_model(m) for m in models}
    config = {
        "eval_version": EVAL_VERSION,
        **opts.model_dump(exclude={"threads"}),
        "models": [str(m) for m in models],
        "splits": sorted(splits),
    }
    spec = stage.Spec(STAGE, Path(output), inputs, config)
    done = None if force else spec.current()
    if done is not None and not done.metrics.get("failed"):
        log.info("%s is up to date (splits, models and options match its manifest): skipped", spec.output)
        return done
    result = stage.publish(spec, lambda tmp: _write(data, models, tmp, opts), started)
    failed = result.metrics["failed"]
    if failed:
        raise StageError(
            f"{len(failed)} of {len(models)} model(s) failed, the others' results are in "
            f"{result.output}: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return result


def _write(data: dict[str, list[recs.Record]], models: list[ModelSpec], out: Path, opts: EvalOptions) -> stage.Built:
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for spec in models:
        try:
            results[spec.name] = _one_model(spec, data, out, opts)
        except Exception as err:  # one model's failure must not lose the others' results
            failed[spec.name] = f"{spec.where}: {type(err).__name__}: {err}"
            log.error("%s failed: %s", spec.name, failed[spec.name])
    table = report.markdown(results, failed, list(data))
    (out / "report.md").write_text(table, encoding="utf-8")
    report.figure(results, failed, list(data), out / "report.png")
    log.info("eval report:\n%s", table)
    outputs = {
        "report": "report.md",
        "figure": "report.png",
        "transcripts": {m: f"transcripts-{m}.jsonl" for m in results},
    }
    return stage.Built({"models": results, "failed": failed}, outputs)


def _one_model(spec: ModelSpec, data: dict[str, list[recs.Record]], out: Path, opts: EvalOptions) -> dict[str, Any]:
    t0 = time.time()
    gen = open_generator(spec, opts.n_ctx, opts.seed, opts.threads, opts.hf_without_cuda)
    load_s = time.time() - t0
    per_split: dict[str, Any] = {}
    try:
        with open(out / f"transcripts-{spec.name}.jsonl", "w", encoding="utf-8", newline="\n") as tr:
            for split, records in data.items():
                scored, tokens, seconds = [], [], 0.0
                for rec in logs.progress(records, desc=f"{spec.name} {split}", unit="rec"):
                    reply = gen.generate(rec.prompt, opts.max_tokens)
                    s = metrics.judge(reply.text, rec.user)
                    scored.append(s)
                    tokens.append(reply.tokens)
                    seconds += reply.seconds
                    tr.write(
                        json.dumps(
                            {
                                "split": split,
                                "id": rec.id,
                                "source": rec.where,
                                "prompt": rec.prompt,
                                "reply": reply.text,
                                "tokens": reply.tokens,
                                "format_ok": s.format_ok,
                                "verdict": s.label,
                                "label": rec.label,
                                "gate": s.gate,
                                "leak": s.leak,
                                "error": s.error,
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                per_split[split] = metrics.figures(
                    scored, [r.label for r in records], [r.reference for r in records], tokens, seconds
                )
    finally:
        gen.close()
    return {"spec": str(spec), "load_seconds": round(load_s, 2), "splits": per_split}
