"""The native pipeline as the end-to-end and stack tests run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/pipeline/tiny.yaml"


def tiny_pipeline(data: Path, *extra: str, wait: bool = True):
    """`python -m services.pipeline` on the tiny profile in `data` (Ollama unreachable: the smoke test asks llama.cpp);
    waited for (CompletedProcess), or started in a session of its own (Popen, output piped)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SO8T_PROGRESS="0", OLLAMA_HOST="http://127.0.0.1:9")
    argv = [sys.executable, "-m", "services.pipeline", "--config", TINY, "--data-dir", str(data)]
    argv += extra
    if not wait:
        return subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
