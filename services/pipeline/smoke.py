"""The chain's last check: start `so8t serve` on the Q4_K_M GGUF (llama.cpp in-process), ask /think, stop it."""

from __future__ import annotations

import os
import subprocess
import time

import httpx

from services.pipeline.config import PipelineConfig
from services.pipeline.plan import serve_command
from services.pipeline.run import free_port
from shared import atomic, logs
from shared.layout import Layout

log = logs.get("pipeline")


def think_smoke(cfg: PipelineConfig, layout: Layout, timeout: float = 120.0) -> dict:
    run = layout.run(cfg.run_id)
    gguf = run.gguf_file(cfg.convert.name, cfg.serve.gguf_type)
    port = free_port()
    argv = [*serve_command(cfg, layout, "llamacpp"), "--host", "127.0.0.1", "--port", str(port)]
    log_path = run.logs / "think-smoke.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"think API exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"think API did not become healthy in {timeout:.0f}s; see {log_path}")
                time.sleep(0.5)
            r = httpx.post(
                f"{base}/think",
                json={"prompt": cfg.smoke.prompt, "max_tokens": cfg.smoke.max_tokens, "temperature": 0.0},
                timeout=timeout,
            )
            result = {"gguf": str(gguf), "prompt": cfg.smoke.prompt, "status_code": r.status_code, "response": r.json()}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    atomic.write_json(run.root / "think_smoke.json", result)
    return result
