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
from collections.abc import Callable
from pathlib import Path

import httpx

from services.pipeline.config import PipelineConfig
from services.pipeline.plan import Stage, plan
from shared import atomic, logs, manifest
from shared.errors import StageError
from shared.layout import Layout
from shared.stage import die_with_parent

log = logs.get("pipeline")


class StageFailed(StageError):
    def __init__(self, stage: str, code: int, log_path: Path):
        super().__init__(f"stage '{stage}' failed with exit code {code}; see {log_path}")
        self.stage, self.code, self.log_path = stage, code, log_path
        self.exit_code = code or 1


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


def native_plan(cfg: PipelineConfig, layout: Layout) -> list[Stage]:
    """The chain as this machine runs it: the Ollama stages only when a server answers (or the profile says so)."""
    stages = plan(cfg, layout)
    o = cfg.ollama
    host, answers = ollama_server() if o.enabled == "auto" else (None, o.enabled == "always")
    if not answers:
        log.info("the Ollama import is skipped: %s", f"no Ollama server at {host}" if host else "ollama.enabled=never")
        stages = [s for s in stages if not s.needs_ollama]
    return stages


class Status:
    """`status.json`: the current stage, progress, ETA, and each stage's outcome."""

    def __init__(
        self,
        path: Path,
        stages: list[Stage],
        history: dict[str, float],
        progress: dict[str, Callable[[], float | None]],
    ):
        self.path, self.names, self.history, self.progress = path, [s.name for s in stages], history, progress
        self.state: dict[str, dict] = {n: {"state": "pending"} for n in self.names}
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
                frac = self.fraction()
                spent = time.time() - st["started"]
                left += past * (1 - frac) if frac is not None else max(0.0, past - spent)
            else:
                left += past
        return round(left, 1)

    def fraction(self) -> float | None:
        """How far the running stage is (only stages that report it, the trainer)."""
        read = self.progress.get(self.current.name) if self.current else None
        return read() if read else None

    def write(self, overall: str = "running") -> None:
        with self._lock:
            cur = self.current
            atomic.write_json(
                self.path,
                {
                    "state": overall,
                    "stage": cur.name if cur else None,
                    "stage_index": self.names.index(cur.name) + 1 if cur else None,
                    "stages_total": len(self.names),
                    "stage_progress": self.fraction(),
                    "eta_seconds": self.eta(),
                    "elapsed_seconds": round(time.time() - self.started, 1),
                    "stages": self.state,
                },
            )


def _run_stage(stage: Stage, log_path: Path, status: Status) -> tuple[int, float]:
    """Run the stage's commands in turn, each line to the console (prefixed) and to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(2.0):
            status.write()

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    code = 0
    with open(log_path, "a", encoding="utf-8") as lf:
        try:
            for argv in stage.commands:
                lf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
                proc = subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    **die_with_parent(),  # an orchestrator killed takes its stage with it, as a power cut would
                )
                try:
                    for line in proc.stdout:  # type: ignore[union-attr]
                        sys.stdout.write(f"[{stage.name}] {line}")
                        sys.stdout.flush()
                        lf.write(line)
                    code = proc.wait()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                if code != 0:
                    break
        finally:
            stop.set()
    return code, time.time() - t0


def run(cfg: PipelineConfig, layout: Layout, smoke: Callable[[PipelineConfig, Layout], dict] | None = None) -> dict:
    """Run every stage in order; returns the summary (stage outcomes and where each artifact is)."""
    run_dir = layout.run(cfg.run_id)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    stages = native_plan(cfg, layout)
    previous = {}
    try:
        previous = json.loads(run_dir.status.read_text()).get("stages", {})
    except (OSError, ValueError):
        pass
    history = {n: s["seconds"] for n, s in previous.items() if s.get("state") == "done" and "seconds" in s}
    status = Status(run_dir.status, stages, history, {"train": _train_progress(run_dir.training_session)})
    for stage in stages:
        before = manifest.read(stage.output) if stage.output else None
        status.current = stage
        status.state[stage.name] = {"state": "running", "started": time.time()}
        status.write()
        log.info("stage %s: %s", stage.name, " && ".join(" ".join(c[2:]) for c in stage.commands))
        log_path = run_dir.logs / f"{stage.name}.log"
        code, seconds = _run_stage(stage, log_path, status)
        if code != 0:
            status.state[stage.name] = {"state": "failed", "exit_code": code, "seconds": round(seconds, 1)}
            status.current = None
            status.write("failed")
            raise StageFailed(stage.name, code, log_path)
        after = manifest.read(stage.output) if stage.output else None
        if stage.output and after is None:
            status.state[stage.name] = {
                "state": "failed",
                "exit_code": 0,
                "seconds": round(seconds, 1),
                "error": f"no manifest in {stage.output}",
            }
            status.write("failed")
            raise StageFailed(stage.name, 0, log_path)
        skipped = before is not None and after is not None and before.get("finished_at") == after.get("finished_at")
        status.state[stage.name] = {"state": "skipped" if skipped else "done", "seconds": round(seconds, 1)}
        log.info("stage %s %s in %.1fs", stage.name, "up to date (skipped)" if skipped else "done", seconds)
    status.current = None
    summary = {
        "run": str(run_dir.root),
        "stages": status.state,
        "artifacts": {
            "dataset": str(layout.dataset(cfg.dataset.id)),
            "train": str(run_dir.final),
            "baked": str(run_dir.baked),
            "gguf": {t: str(run_dir.gguf_file(cfg.convert.name, t)) for t in cfg.convert.types},
            "eval": str(run_dir.eval),
        },
    }
    if smoke is not None:
        from services.eval.acceptance import require

        require(str(run_dir.eval), [cfg.serve.gguf_type])  # never serve a quant that failed eval.acceptance
        summary["smoke"] = smoke(cfg, layout)
    status.write("done")
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
