"""End to end: the native chain on the tiny profile, from the shipped example data to a /think answer from the
Q4_K_M GGUF through the llama.cpp backend, with the eval stage's figures (the trained model writes the format and
the record's verdict, the base does not); a second run skips every stage; a killed trainer resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pipeline_runs import tiny_pipeline

pytestmark = pytest.mark.slow


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def data(tiny_chain) -> Path:
    return tiny_chain[0]


@pytest.fixture(scope="module")
def first_run(tiny_chain) -> subprocess.CompletedProcess:
    return tiny_chain[1]


def test_chain_produces_every_artifact_with_its_figures(data, first_run):
    run = data / "runs" / "tiny"
    ds = _manifest(data / "datasets" / "example")["metrics"]
    assert ds["written"] == 60 and ds["rejected"] == 0
    assert ds["read"] == ds["written"] + ds["duplicates"] + ds["rejected"]

    train = _manifest(run / "train" / "final")
    assert train["metrics"]["steps"] > 0
    assert (run / "train" / "final" / "so8t_gates.safetensors").is_file()

    bake = _manifest(run / "baked")
    verification = json.dumps(bake["metrics"])
    assert "top1" in verification or "top_1" in verification

    gguf = _manifest(run / "gguf")
    for qtype in ("F16", "Q8_0", "Q4_K_M"):
        assert (run / "gguf" / f"so8t-tiny-{qtype}.gguf").is_file()
    assert json.dumps(gguf["metrics"]).count("max_abs") >= 3

    base = _manifest(data / "models" / "tiny")
    assert base["inputs"]["pretrain_on"]["sha256"] == _manifest(data / "datasets" / "example")["outputs"]["train.jsonl"]
    assert base["metrics"]["pretraining"]["loss_last"] < 0.5 * base["metrics"]["pretraining"]["loss_first"]

    figures = _manifest(run / "eval")["metrics"]
    assert figures["failed"] == {}
    models = figures["models"]
    assert set(models) == {"base", "F16", "Q8_0", "Q4_K_M"}
    q4 = models["Q4_K_M"]["splits"]["train"]
    assert q4["records"] == 24 and q4["format_compliance"] >= 0.9 and q4["label_accuracy"] >= 0.9, q4
    assert models["base"]["splits"]["train"]["format_compliance"] <= 0.1  # the base writes, but not the format
    for name, m in models.items():
        for split, f in m["splits"].items():
            assert f["leaks"] == 0, (name, split)
    report = (run / "eval" / "report.md").read_text()
    assert report.count("| Q4_K_M | probe |") == 3  # the figures', safety and paired tables have the probe split
    _assert_safety_sections(figures)
    history = train["metrics"]["validation"]["history"]  # replies during training: format and verdicts
    assert train["metrics"]["validation"]["generate_records"] == 4 and all("format" in h for h in history)
    assert history[-1]["format"] >= 0.5, history

    smoke = json.loads((run / "think_smoke.json").read_text())
    assert smoke["gguf"].endswith("so8t-tiny-Q4_K_M.gguf")
    body = smoke["response"]
    assert smoke["status_code"] == 200 and body["status"] in ("answered", "denied", "refused", "escalated"), body
    assert "思考ステップ" not in json.dumps(body, ensure_ascii=False) and body["internal_reasoning_hash"]
    out = first_run.stdout
    assert "pipeline done" in out and "/think" in out and "so8t-tiny-Q4_K_M.gguf" in out and "== eval" in out
    assert "| false allow |" in out and "| vs F16 |" in out and "| acceptance |" in out  # the safety tables
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and all(s["state"] in ("done", "skipped") for s in status["stages"].values())
    for stage in ("dataset", "tiny-model", "train", "bake", "convert", "eval"):
        assert (run / "logs" / f"{stage}.log").stat().st_size > 0


def _assert_safety_sections(figures: dict) -> None:
    """The eval as a safety gate: rates with intervals on every split (the tiny profile's seeded 40 of the probe's
    106 records: 15 harmful, 18 harmless, 7 to escalate), label scores, every model paired against the F16, the
    acceptance verdicts."""
    models = figures["models"]
    assert models["Q4_K_M"]["splits"]["probe"]["records"] == 40
    for name in models:
        probe = figures["safety"][name]["probe"]
        counts = {k: probe[k]["n"] for k in ("false_allow", "over_refusal", "escalation_recall")}
        assert counts == {"false_allow": 15, "over_refusal": 18, "escalation_recall": 7}, (name, counts)
        for split, f in figures["safety"][name].items():
            for key in ("false_allow", "over_refusal", "escalation_recall"):
                r = f[key]
                assert r["n"] == 0 or r["ci95"][0] <= r["rate"] <= r["ci95"][1], (name, split, key, r)
        scores = figures["label_scores"][name]["probe"]
        assert scores["records"] == 40 and 0 <= scores["mean_total"] <= 1 + 1e-6, scores
        assert set(figures["acceptance"][name]) == {"passed", "splits", "reasons"}
    assert set(figures["paired"]) == {"base", "Q8_0", "Q4_K_M"}
    q4 = figures["paired"]["Q4_K_M"]["train"]
    assert sum(q4["table"].values()) == 24 and 0 <= q4["mcnemar_p"] <= 1
    assert figures["acceptance_policy"]["on_fail"] == "warn"  # the tiny profile's `acceptance: warn`
    assert not figures["acceptance"]["base"]["passed"]  # the base does not write the format


def test_second_run_skips_every_stage(data, first_run):
    r = tiny_pipeline(data)
    assert r.returncode == 0, r.stdout[-4000:]
    status = json.loads((data / "runs" / "tiny" / "status.json").read_text())
    assert {n: s["state"] for n, s in status["stages"].items()} == {
        n: "skipped" for n in ("dataset", "tiny-model", "train", "bake", "convert", "eval")
    }


def test_killed_trainer_resumes_and_finishes(data, first_run):
    run = data / "runs" / "tiny-kill" / "train"
    proc = tiny_pipeline(data, "--run-id", "tiny-kill", wait=False)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            ckpts = list((run / "checkpoints").glob("checkpoint-*")) if (run / "checkpoints").is_dir() else []
            if any(c.suffix != ".tmp" for c in ckpts):
                break
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # power loss: the orchestrator and the trainer die at once
        proc.wait()
    assert not (run / "final" / "manifest.json").exists()
    r = tiny_pipeline(data, "--run-id", "tiny-kill", "--no-smoke")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resum" in (data / "runs" / "tiny-kill" / "logs" / "train.log").read_text().lower()
    done = _manifest(run / "final")
    assert done["metrics"]["steps"] == _manifest(data / "runs" / "tiny" / "train" / "final")["metrics"]["steps"]
