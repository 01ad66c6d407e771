"""Run the whole chain natively (dataset, train, bake, convert, Ollama if reachable, /think smoke)."""

from __future__ import annotations

import argparse
import json

from services.pipeline.config import PipelineConfig
from shared import flags

OVERRIDES = ("run_id", "train.max_steps")  # flags that override the profile's values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline profile, e.g. configs/pipeline/tiny.yaml")
    p.add_argument("--data-dir", help="data volume (default: $DATA_DIR, else ./data)")
    flags.add(p, PipelineConfig, OVERRIDES, overrides=True)
    p.add_argument("--no-smoke", action="store_true", help="skip the /think API smoke test at the end")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from services.pipeline.run import run as run_pipeline
    from services.pipeline.smoke import think_smoke
    from shared.config import load_config
    from shared.layout import Layout, data_dir

    cfg = load_config(PipelineConfig, args.config, flags.given(args, PipelineConfig, OVERRIDES))
    root = Path(args.data_dir) if args.data_dir else data_dir()
    os.environ["DATA_DIR"] = str(root)  # every stage process (and the think API's audit log) uses the same volume
    summary = run_pipeline(cfg, Layout(root), None if args.no_smoke else think_smoke)
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
    report = Path(summary["artifacts"]["eval"]) / "report.md"
    if report.is_file():
        print(f"\n== eval ({report}) ==\n{report.read_text(encoding='utf-8')}")
    if "smoke" in summary:
        s = summary["smoke"]
        print(
            f"/think ({s['gguf']}):\n  prompt : {s['prompt']}\n  status : {s['status_code']}\n"
            f"  answer : {json.dumps(s['response'], ensure_ascii=False)}"
        )
    return 0
