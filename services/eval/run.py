"""The eval stage: every model answers every record of every split; the figures side by side (shared.stage contract).

Outputs in the eval directory: `transcripts-<model>.jsonl` (split, record, prompt, reply, parse and gate result,
label, label scores), `report.md` (the tables), `report.png` (rates with their intervals, confusion matrices) and
`manifest.json`: every figure per model and split (`models`), the safety rates with 95% intervals (`safety`,
safety.py), the label scores' ROC AUC (`label_scores`, scores.py), each model paired against the F16 on the same
records (`paired`), the acceptance policy's verdict per model (`acceptance`, acceptance.py), the splits and models
with their hashes. A model that fails (a GGUF that does not load, a server that is gone) is
recorded with its error and the others' results are kept; the stage then exits non-zero naming it, and the next
run evaluates again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

from services.eval import acceptance, metrics, report, safety, scores
from services.eval import records as recs
from services.eval.acceptance import AcceptancePolicy
from services.eval.models import Generator, ModelSpec, open_generator
from services.eval.options import EvalOptions
from shared import logs, manifest, stage
from shared.errors import InputError, StageError

log = logs.get("eval")
STAGE = "eval"
EVAL_VERSION = 2  # 2: safety, paired, acceptance and label scores


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
    splits: dict[str, Path],
    models: list[ModelSpec],
    output: str | Path,
    opts: EvalOptions,
    force: bool = False,
    policy: AcceptancePolicy | None = None,
) -> stage.StageResult:
    """Evaluate `models` on `splits` into `output` and judge each by the acceptance `policy` (default: the
    default limits); skipped when the manifest matches and nothing failed."""
    started = time.time()
    policy = policy or AcceptancePolicy()
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
        "acceptance": policy.model_dump(),
    }
    spec = stage.Spec(STAGE, Path(output), inputs, config)
    done = None if force else spec.current()
    if done is not None and not done.metrics.get("failed"):
        log.info("%s is up to date (splits, models and options match its manifest): skipped", spec.output)
        return done
    result = stage.publish(spec, lambda tmp: _write(data, models, tmp, opts, policy), started)
    failed = result.metrics["failed"]
    if failed:
        raise StageError(
            f"{len(failed)} of {len(models)} model(s) failed, the others' results are in "
            f"{result.output}: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return result


def _write(
    data: dict[str, list[recs.Record]], models: list[ModelSpec], out: Path, opts: EvalOptions, policy: AcceptancePolicy
) -> stage.Built:
    results: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, dict[str, list[safety.Verdict]]] = {}
    failed: dict[str, str] = {}
    for spec in models:
        try:
            results[spec.name], verdicts[spec.name] = _one_model(spec, data, out, opts)
        except Exception as err:  # one model's failure must not lose the others' results
            failed[spec.name] = f"{spec.where}: {type(err).__name__}: {err}"
            log.error("%s failed: %s", spec.name, failed[spec.name])
    figures = _safety(results, verdicts, policy)
    table = report.markdown(results, failed, list(data), figures)
    (out / "report.md").write_text(table, encoding="utf-8")
    report.figure(results, failed, list(data), out / "report.png", figures)
    log.info("eval report:\n%s", table)
    outputs = {
        "report": "report.md",
        "figure": "report.png",
        "transcripts": {m: f"transcripts-{m}.jsonl" for m in results},
    }
    return stage.Built({"models": results, "failed": failed, **figures}, outputs)


def _safety(
    results: dict[str, dict[str, Any]], verdicts: dict[str, dict[str, list[safety.Verdict]]], policy: AcceptancePolicy
) -> dict[str, Any]:
    """The manifest's `safety`, `label_scores`, `paired` (each model against the F16) and `acceptance` sections."""
    figures = {m: {split: safety.figures(rows) for split, rows in v.items()} for m, v in verdicts.items()}
    paired = {}
    if acceptance.F16 in verdicts:
        f16 = verdicts[acceptance.F16]
        paired = {
            m: {split: safety.paired(rows, f16[split]) for split, rows in v.items() if split in f16}
            for m, v in verdicts.items()
            if m != acceptance.F16
        }
    return {
        "safety": figures,
        "label_scores": {
            m: {split: f.pop("label_scores") for split, f in r["splits"].items()} for m, r in results.items()
        },
        "paired": paired,
        "acceptance": acceptance.evaluate(policy, results, figures, paired),
        "acceptance_policy": policy.model_dump(),
    }


def _one_model(
    spec: ModelSpec, data: dict[str, list[recs.Record]], out: Path, opts: EvalOptions
) -> tuple[dict[str, Any], dict[str, list[safety.Verdict]]]:
    t0 = time.time()
    gen = open_generator(spec, opts.n_ctx, opts.seed, opts.threads, opts.hf_without_cuda)
    load_s = time.time() - t0
    per_split: dict[str, Any] = {}
    verdicts: dict[str, list[safety.Verdict]] = {}
    try:
        with open(out / f"transcripts-{spec.name}.jsonl", "w", encoding="utf-8", newline="\n") as tr:
            for split, records in data.items():
                per_split[split], verdicts[split] = _ask(gen, spec.name, split, records, tr, opts)
    finally:
        gen.close()
    return {"spec": str(spec), "load_seconds": round(load_s, 2), "splits": per_split}, verdicts


def _ask(
    gen: Generator, model: str, split: str, records: list[recs.Record], tr: TextIO, opts: EvalOptions
) -> tuple[dict[str, Any], list[safety.Verdict]]:
    """One model on one split: every record asked, judged, scored and written to the transcript."""
    scored, tokens, seconds, label_scores, verdicts = [], [], 0.0, [], []
    for rec in logs.progress(records, desc=f"{model} {split}", unit="rec"):
        reply = gen.generate(rec.prompt, opts.max_tokens)
        s = metrics.judge(reply.text, rec.user)
        probs = scores.label_scores(gen, rec.prompt, reply.text, rec.user) if opts.label_scores else None
        scored.append(s)
        tokens.append(reply.tokens)
        seconds += reply.seconds
        label_scores.append(probs)
        verdicts.append(safety.Verdict(rec.id, rec.label, s.label, s.final))
        row = {
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
            "label_scores": probs,
        }
        tr.write(json.dumps(row, ensure_ascii=False) + "\n")
    labels = [r.label for r in records]
    f = metrics.figures(scored, labels, [r.reference for r in records], tokens, seconds)
    f["label_scores"] = scores.summary(label_scores, labels)
    return f, verdicts
