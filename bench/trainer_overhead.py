"""SO(8) gate overhead: training step time and peak memory of LoRA + gates against plain LoRA, same model and data.

    python bench/trainer_overhead.py                      # CPU: tiny and mid
    python bench/trainer_overhead.py --sizes phi35        # CUDA: Phi-3.5-mini dimensions, seq 2048, 8-bit
Each (size, variant) runs in its own process (so peak memory is its own) with the trainer's real pieces:
base load (quantised per size), LoRA on the four Phi-3 modules, gates on every layer, the Objective (LM on
the assistant half + PET + orthogonality), the optimizer. Random weights, random tokens; batch 1.
Prints a table: median step seconds, tokens/s, peak memory (CUDA: max allocated; CPU: peak RSS growth over
the loaded model), and the gates' step-time overhead. Targets: overhead <= 2%; phi35 8-bit under 11.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (hidden, layers, heads, intermediate, seq, quantization, LoRA r)
VARIANTS = ("lora", "lora+gates")
SIZES = {
    "tiny": (256, 2, 4, 512, 512, "none", 16),
    "mid": (1024, 4, 16, 2816, 512, "none", 64),
    "phi35": (3072, 32, 32, 8192, 2048, "8bit", 64),
}


def build_model(size: str, directory: Path) -> None:
    import torch
    from transformers import Phi3ForCausalLM

    from shared.tiny import tiny_config

    hidden, layers, heads, inter, *_ = SIZES[size]
    torch.manual_seed(0)
    model = Phi3ForCausalLM._from_config(
        tiny_config(hidden, layers, heads, inter), dtype=torch.bfloat16 if size == "phi35" else torch.float32
    )
    model.save_pretrained(directory, safe_serialization=True)


def child(size: str, variant: str, model_dir: str, steps: int) -> dict:
    import torch

    from services.trainer.config import LoraSection, ModelSection, OptimSection
    from services.trainer.distributed import setup
    from services.trainer.gates import attach_gates
    from services.trainer.model import add_lora, build_optimizer, load_base
    from services.trainer.objective import Objective

    _, _, _, _, seq, quant, r = SIZES[size]
    device = setup().device
    cuda = device.type == "cuda"
    mcfg = ModelSection(
        base_model=model_dir, quantization=quant, precision="bf16" if cuda else "fp32", gradient_checkpointing=cuda
    )
    model = add_lora(load_base(mcfg, model_dir, device), LoraSection(r=r, alpha=2 * r, dropout=0.05), model_dir, 0)
    gates = attach_gates(model, None, None, 0.05, seed=0) if variant == "lora+gates" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(
        OptimSection(optimizer="paged_adamw_8bit" if cuda else "adamw_torch"), [{"params": params}], device
    )
    objective = Objective(model, gates, pet_enabled=True, huber_delta=0.0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (1, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half carries no loss, as in the SFT data
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            lm, pet, ortho, _ = objective(ids, mask, labels)
        loss = lm / (seq // 2) + 0.05 * pet + 1e-4 * ortho
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "CUDA max allocated"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
        kind = "RSS growth"
    return {
        "size": size,
        "variant": variant,
        "seq": seq,
        "quant": quant,
        "device": str(device),
        "times": times,
        "peak_mib": peak,
        "mem_kind": kind,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after 2 warm-up steps)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs per variant, interleaved (lora, gates, lora, …); a shared CPU is noisy, so the "
        "table shows the fastest step and the median",
    )
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "VARIANT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, steps=args.steps)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model_dir = Path(tmp) / size
            build_model(size, model_dir)
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--steps",
                            str(args.steps),
                            "--child",
                            size,
                            variant,
                            str(model_dir),
                        ],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        env=dict(os.environ, SO8T_PROGRESS="0"),
                    )
                    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                    if out.returncode or not line:
                        sys.exit(f"{size}/{variant} failed:\n{out.stderr[-3000:]}")
                    results.setdefault((size, variant), []).append(json.loads(line[0][7:]))
    print(
        f"{'size':<6} {'variant':<11} {'device':<7} {'quant':<5} {'seq':>5} {'best s':>7} {'median s':>8} "
        f"{'tok/s':>7} {'peak MiB':>9}  {'gate overhead (best / median)':>29}"
    )
    best: dict[str, tuple[float, float]] = {}
    for (size, variant), runs in results.items():
        times = [t for r in runs for t in r["times"]]
        b, m = min(times), statistics.median(times)
        r = runs[0]
        over = ""
        if variant == "lora":
            best[size] = (b, m)
        else:
            over = f"{100 * (b / best[size][0] - 1):+.1f}% / {100 * (m / best[size][1] - 1):+.1f}%"
        peak = max(x["peak_mib"] for x in runs)
        print(
            f"{size:<6} {variant:<11} {r['device']:<7} {r['quant']:<5} {r['seq']:>5} {b:>7.3f} {m:>8.3f} "
            f"{r['seq'] / b:>7.0f} {peak:>9.0f}  {over:>29}"
        )
    first = next(iter(results.values()))[0]
    print(
        f"(peak memory: {first['mem_kind']}; CPU threads {first['threads']}; {args.rounds} runs x {args.steps} "
        f"steps per variant)"
    )


if __name__ == "__main__":
    main()
