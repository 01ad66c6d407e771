"""`so8t serve` on a GGUF through llama.cpp, one POST /think and one /v1/chat/completions (the official `openai`
client), then stopped: the full-size rehearsal's serving check. Writes the statuses, answers and latencies as JSON.

    python bench/_serve_once.py --gguf FILE --json OUT [--port 8765]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "services.think_api",
            "--backend",
            "llamacpp",
            "--model",
            args.gguf,
            "--port",
            str(args.port),
            "--audit-db",
            str(Path(tmp) / "audit.sqlite3"),
            "--timeout",
            "900",
        ]
        server = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, DATA_DIR=tmp), start_new_session=True)
        out: dict = {}
        try:
            t0 = time.time()
            while time.time() - t0 < 900:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"so8t serve exited {server.returncode}")
                time.sleep(2)
            out["load_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            r = httpx.post(
                f"{url}/think", json={"prompt": "2+2はいくつですか？", "max_new_tokens": args.max_tokens}, timeout=900
            )
            out.update(
                think_status=r.status_code,
                think_s=round(time.time() - t0, 1),
                think_answer=r.json().get("answer") or r.json().get("error", {}).get("code", ""),
            )
            from openai import OpenAI

            client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=900)
            model = client.models.list().data[0].id
            t0 = time.time()
            try:
                c = client.chat.completions.create(
                    model=model, max_tokens=args.max_tokens, messages=[{"role": "user", "content": "What is 2+2?"}]
                )
                out.update(chat_status=200, chat_answer=c.choices[0].message.content)
            except Exception as err:  # a withheld reply is an API error (502): still an answer of the server
                out.update(chat_status=getattr(err, "status_code", None), chat_answer=str(err)[:200])
            out["chat_s"] = round(time.time() - t0, 1)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
