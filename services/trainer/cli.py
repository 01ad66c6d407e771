"""Train LoRA + SO(8) rotation gates with PET on /think SFT data; resumes from the newest good checkpoint.

Writes <output-dir>/final/ (adapter, so8t_gates.safetensors, manifest.json), <output-dir>/checkpoints/,
<output-dir>/tensorboard/ and <output-dir>/training_session.json. Runs as is under `torchrun` or
`accelerate launch` (DDP, one process per GPU).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training profile YAML (configs/train/{full,fast,tiny}.yaml)")
    p.add_argument("--dataset", required=True, help="train.jsonl written by `so8t dataset`")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints/, final/, tensorboard/)")
    p.add_argument("--base-model", default=None, help="hub id or local directory (overrides model.base_model)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.max_steps)")
    p.add_argument("--seed", type=int, default=None, help="seed (overrides train.seed)")
    p.add_argument("--fresh", action="store_true",
                   help="discard checkpoints and start over (default: resume from the newest good checkpoint)")


def run(args: argparse.Namespace) -> int:
    from services.trainer.config import TrainConfig
    from shared.config import load_config

    cfg = load_config(TrainConfig, args.config, {"model.base_model": args.base_model,
                                                 "train.max_steps": args.max_steps, "train.seed": args.seed})
    if cfg.train.deterministic:  # read by MKL / cuBLAS when they initialise, so before torch is imported
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    from services.trainer import distributed
    from services.trainer.data import DataError
    from services.trainer.loop import ResumeError, train
    from services.trainer.model import ModelError

    dist = distributed.setup()
    try:
        result = train(cfg, args.dataset, args.output_dir, dist, fresh=args.fresh)
    except (DataError, ModelError, ResumeError) as err:
        print(f"so8t train: {err}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    if dist.main:
        if result.skipped:
            print(f"{result.final}: up to date, skipped")
        else:
            fl = result.metrics.get("final_losses", {})
            print(f"trained {result.steps} steps: lm {fl.get('lm')} pet {fl.get('pet')} ortho {fl.get('ortho')}; "
                  f"final artifact in {result.final}")
    return 0
