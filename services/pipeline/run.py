"""Run the chain natively: dataset -> train -> bake -> convert -> (ollama) -> think-API smoke.

Each stage runs as its own process (`python -m services.<stage>`), exactly as its container would; its output
streams to the console and to `<run>/logs/<stage>.log`. Stages skip themselves when their manifest matches their
inputs, the trainer resumes from its newest checkpoint, and the first failing stage stops the chain by name.
`<run>/status.json` (atomic) says which stage runs, the progress and an ETA.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from services.pipeline.config import PipelineConfig
from shared import atomic, logs, manifest
from shared.layout import Layout, RunLayout, ollama_tag

log = logs.get("pipeline")


@dataclass
class Stage:
    name: str
    argv: list[str]
    output: Path | None  # directory whose manifest.json proves the stage ran
    progress: Callable[[], float | None] = lambda: None


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, log_path: Path):
        super().__init__(f"stage '{stage}' failed with exit code {code}; its log: {log_path}")
        self.stage, self.code, self.log_path = stage, code, log_path


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _train_progress(session: Path) -> Callable[[], float | None]:
    def read() -> float | None:
        try:
            s = json.loads(session.read_text())
            return min(1.0, s["step"] / max(1, s["total_steps"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return read


def ollama_server(timeout: float = 2.0) -> tuple[str, bool]:
    """Where the official client finds Ollama ($OLLAMA_HOST, parsed as it parses it), and whether it answers."""
    import ollama

    from services.ollama import importer

    c = importer.client(timeout=timeout)
    try:
        c.list()
        return importer.host_of(c), True
    except (ConnectionError, httpx.HTTPError, ollama.ResponseError):
        return importer.host_of(c), False


def plan(cfg: PipelineConfig, layout: Layout) -> list[Stage]:
    run = layout.run(cfg.run_id)
    ds = layout.dataset(cfg.dataset.id)
    base = cfg.train.base_model
    stages: list[Stage] = []
    if base == "tiny":
        base = str(layout.root / "models" / "tiny")
        if not (Path(base) / "config.json").is_file():
            stages.append(Stage("tiny-model", _py("services.tiny_model", "--output", base), None))
    d = cfg.dataset
    stages.append(Stage("dataset", _py("services.dataset", *sum((["--input", i] for i in d.inputs), []),
                                       "--output", str(ds), "--format", d.format, "--val-ratio", str(d.val_ratio),
                                       "--seed", str(d.seed)), ds))
    t = cfg.train
    train_args = ["--config", t.config, "--dataset", str(ds / "train.jsonl"), "--output-dir", str(run.train),
                  "--base-model", base]
    if t.max_steps:
        train_args += ["--max-steps", str(t.max_steps)]
    if t.seed is not None:
        train_args += ["--seed", str(t.seed)]
    stages.append(Stage("train", _py("services.trainer", *train_args), run.final, _train_progress(run.training_session)))
    stages.append(Stage("bake", _py("services.baker", "--trained", str(run.final), "--output", str(run.baked),
                                    "--dtype", cfg.bake.dtype), run.baked))
    stages.append(Stage("convert", _py("services.converter", "--model", str(run.baked), "--output-dir", str(run.gguf),
                                       "--name", cfg.convert.name, "--types", *cfg.convert.types), run.gguf))
    o = cfg.ollama
    host, answers = ollama_server() if o.enabled == "auto" else (None, o.enabled == "always")
    if answers:
        ggufs = [str(run.gguf_file(cfg.convert.name, qtype)) for qtype in cfg.convert.types]
        stages.append(Stage("ollama-import", _py("services.ollama", "import", "--gguf", *ggufs, "--model", o.model,
                                                 "--run-dir", str(run.ollama), "--format", cfg.dataset.format), None))
        stages.append(Stage("ollama-smoke", _py("services.ollama", "smoke", "--model",
                                                f"{o.model}:{ollama_tag(o.smoke_type)}", "--output", str(run.ollama)),
                            None))
    else:
        log.info("the Ollama import is skipped: %s", f"no Ollama server at {host}" if host else "ollama.enabled=never")
    return stages


class Status:
    """`status.json`: the current stage, progress, ETA, and each stage's outcome."""

    def __init__(self, path: Path, stages: list[Stage], history: dict[str, float]):
        self.path, self.names, self.history = path, [s.name for s in stages], history
        self.state = {n: {"state": "pending"} for n in self.names}
        self.current: Stage | None = None
        self.started = time.time()
        self._lock = threading.Lock()

    def eta(self) -> float | None:
        """Seconds left, from the durations of the last run (unknown for stages never timed)."""
        left = 0.0
        for name in self.names:
            st = self.state[name]
            if st["state"] in ("done", "skipped", "failed"):
                continue
            past = self.history.get(name)
            if past is None:
                return None
            if st["state"] == "running":
                frac = self.current.progress() if self.current else None
                spent = time.time() - st["started"]
                left += past * (1 - frac) if frac is not None else max(0.0, past - spent)
            else:
                left += past
        return round(left, 1)

    def write(self, overall: str = "running") -> None:
        with self._lock:
            cur = self.current
            atomic.write_json(self.path, {
                "state": overall,
                "stage": cur.name if cur else None,
                "stage_index": self.names.index(cur.name) + 1 if cur else None,
                "stages_total": len(self.names),
                "stage_progress": cur.progress() if cur else None,
                "eta_seconds": self.eta(),
                "elapsed_seconds": round(time.time() - self.started, 1),
                "stages": self.state,
            })


def _run_stage(stage: Stage, log_path: Path, status: Status) -> tuple[int, float]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8") as lf:
        lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(stage.argv)}\n")
        proc = subprocess.Popen(stage.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", bufsize=1)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(2.0):
                status.write()

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(f"[{stage.name}] {line}")
                sys.stdout.flush()
                lf.write(line)
            code = proc.wait()
        finally:
            stop.set()
            if proc.poll() is None:
                proc.kill()
    return code, time.time() - t0


def run(cfg: PipelineConfig, layout: Layout, smoke: Callable[[PipelineConfig, RunLayout], dict] | None = None) -> dict:
    """Run every stage in order; returns the summary (stage outcomes and where each artifact is)."""
    run_dir = layout.run(cfg.run_id)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg, layout)
    previous = {}
    try:
        previous = json.loads((run_dir.root / "status.json").read_text()).get("stages", {})
    except (OSError, ValueError):
        pass
    history = {n: s["seconds"] for n, s in previous.items() if s.get("state") == "done" and "seconds" in s}
    status = Status(run_dir.root / "status.json", stages, history)
    for stage in stages:
        before = manifest.read(stage.output) if stage.output else None
        status.current = stage
        status.state[stage.name] = {"state": "running", "started": time.time()}
        status.write()
        log.info("stage %s: %s", stage.name, " ".join(stage.argv[2:]))
        code, seconds = _run_stage(stage, run_dir.root / "logs" / f"{stage.name}.log", status)
        if code != 0:
            status.state[stage.name] = {"state": "failed", "exit_code": code, "seconds": round(seconds, 1)}
            status.current = None
            status.write("failed")
            raise StageFailed(stage.name, code, run_dir.root / "logs" / f"{stage.name}.log")
        after = manifest.read(stage.output) if stage.output else None
        if stage.output and after is None:
            status.state[stage.name] = {"state": "failed", "exit_code": 0, "seconds": round(seconds, 1),
                                        "error": f"no manifest in {stage.output}"}
            status.write("failed")
            raise StageFailed(stage.name, 0, run_dir.root / "logs" / f"{stage.name}.log")
        skipped = before is not None and after is not None and before.get("finished_at") == after.get("finished_at")
        status.state[stage.name] = {"state": "skipped" if skipped else "done", "seconds": round(seconds, 1)}
        log.info("stage %s %s in %.1fs", stage.name, "up to date (skipped)" if skipped else "done", seconds)
    status.current = None
    summary = {"run": str(run_dir.root), "stages": status.state, "artifacts": {
        "dataset": str(layout.dataset(cfg.dataset.id)), "train": str(run_dir.final), "baked": str(run_dir.baked),
        "gguf": {t: str(run_dir.gguf_file(cfg.convert.name, t)) for t in cfg.convert.types},
    }}
    if smoke is not None:
        summary["smoke"] = smoke(cfg, run_dir)
    status.write("done")
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
