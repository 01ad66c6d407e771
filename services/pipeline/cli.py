"""Run the whole chain natively (dataset, train, bake, convert, Ollama if reachable, /think smoke)."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline profile, e.g. configs/pipeline/tiny.yaml")
    p.add_argument("--data-dir", help="data volume (default: $DATA_DIR, else ./data)")
    p.add_argument("--run-id", help="override the profile's run_id")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--no-smoke", action="store_true", help="skip the /think API smoke test at the end")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from services.pipeline.config import PipelineConfig
    from services.pipeline.run import StageFailed, run as run_pipeline
    from services.pipeline.smoke import think_smoke
    from shared.config import load_config
    from shared.layout import Layout, data_dir

    cfg = load_config(PipelineConfig, args.config, {"run_id": args.run_id, "train.max_steps": args.max_steps})
    root = Path(args.data_dir) if args.data_dir else data_dir()
    os.environ["DATA_DIR"] = str(root)  # every stage process (and the think API's audit log) uses the same volume
    try:
        summary = run_pipeline(cfg, Layout(root), None if args.no_smoke else think_smoke)
    except StageFailed as err:
        print(f"\npipeline failed at stage '{err.stage}' (exit {err.code}); see {err.log_path}", file=sys.stderr)
        return err.code or 1
    print("\n== pipeline done ==")
    print(f"run directory : {summary['run']}")
    for name, st in summary["stages"].items():
        print(f"  {name:<24} {st['state']:<8} {st.get('seconds', 0):>8.1f}s")
    for name, path in summary["artifacts"].items():
        if isinstance(path, dict):
            for t, f in path.items():
                print(f"  {name} {t:<8} {f}")
        else:
            print(f"  {name:<13} {path}")
    if "smoke" in summary:
        s = summary["smoke"]
        print(f"/think ({s['gguf']}):\n  prompt : {s['prompt']}\n  status : {s['status_code']}\n"
              f"  answer : {json.dumps(s['response'], ensure_ascii=False)}")
    return 0
