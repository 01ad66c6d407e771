"""Train LoRA + SO(8) rotation gates with PET on /think SFT data; resumes from the newest good checkpoint.

Writes <output-dir>/final/ (adapter, so8t_gates.safetensors, manifest.json), <output-dir>/checkpoints/,
<output-dir>/tensorboard/ and <output-dir>/training_session.json. Runs as is under `torchrun` or
`accelerate launch` (DDP, one process per GPU).
"""

from __future__ import annotations

import argparse
import os

from services.trainer.config import TrainConfig
from services.trainer.options import TrainOptions
from shared import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training profile YAML (configs/train/{full,fast,tiny}.yaml)")
    p.add_argument("--dataset", required=True, help="train.jsonl written by `so8t dataset`")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints/, final/, tensorboard/)")
    p.add_argument(
        "--val-dataset",
        default=None,
        help="val.jsonl for train.eval_steps (default: the val.jsonl beside --dataset, if any)",
    )
    flags.add(p, TrainOptions)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard checkpoints and start over (default: resume from the newest good checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    from shared.config import load_config

    opts = flags.parse(TrainOptions, args)
    cfg = load_config(TrainConfig, args.config, opts.config_overrides())
    if cfg.train.deterministic:  # read by MKL / cuBLAS when they initialise, so before torch is imported
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # read by the CUDA caching allocator when it starts: fragmentation is what OOMs a long-sequence QLoRA run
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from services.trainer import distributed
    from services.trainer.loop import train

    dist = distributed.setup()
    try:
        result = train(
            cfg,
            args.dataset,
            args.output_dir,
            dist,
            fresh=args.fresh,
            val_dataset=args.val_dataset,
            allow_cpu=opts.allow_cpu,
        )
    finally:
        dist.close()
    if dist.main:
        if result.skipped:
            print(f"{result.output}: up to date, skipped")
        else:
            m = result.metrics
            fl = m.get("final_losses", {})
            print(
                f"trained {m['steps']} steps: lm {fl.get('lm')} pet {fl.get('pet')} ortho {fl.get('ortho')}; "
                f"final artifact in {result.output}"
            )
    return 0
