"""Bake time and peak memory for a random-weight Phi-3 of the real Phi-3.5-mini dimensions (or a smaller one).

    python bench/bake_memory.py [--preset full|small|tiny ...] [--dtype bfloat16] [--workdir DIR] [--keep]

For each preset it writes a random base model to disk shard by shard (bfloat16, like the released checkpoint; the
full size is 7.6 GB and is never held in memory), a LoRA adapter (r=16 on every Phi-3 target, non-zero B) and
SO(8) gates on every layer, then runs `python -m services.baker` in a child process and prints a table:
bake phases (input hashing and checks, streaming merge+fold+write, verification by reload), and the child's peak
RSS after the write phase (the bounded part: one tensor's float32 copy at a time) and overall (verification holds
one float32 model at a time: the reference, then the reloaded bake). Needs disk for the base plus the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from services.baker.weights import SafetensorsStream, TensorPlan, cut_into_shards, shard_names  # noqa: E402
from shared import atomic, manifest, so8  # noqa: E402
from shared.tiny import build_tokenizer, tiny_config  # noqa: E402

PRESETS = {  # hidden, layers, heads, intermediate (vocab is Phi-3's 32064 throughout)
    "full": (3072, 32, 32, 8192),  # Phi-3.5-mini-instruct
    "small": (1024, 8, 8, 2816),
    "tiny": (256, 2, 4, 512),
}
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def base_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight", (3 * h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight", (2 * i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_base(out: Path, preset: str, shard_bytes: int = 5 * 2**30) -> float:
    """A random bfloat16 Phi-3 with tokenizer, streamed to disk one tensor at a time. Returns GB written."""
    hidden, layers, heads, inter = PRESETS[preset]
    cfg = tiny_config(hidden=hidden, layers=layers, heads=heads, intermediate=inter)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    plans = [TensorPlan(n, out, s, torch.bfloat16) for n, s in base_tensors(cfg)]
    shards = cut_into_shards(plans, shard_bytes)
    names = shard_names(len(shards))
    for plan, fname in zip(shards, names):
        stream = SafetensorsStream(out / fname, plan)
        for p in plan:
            t = torch.ones(p.shape) if p.name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
            stream.write(p.name, t.to(torch.bfloat16))
        stream.close()
    if len(names) > 1:
        atomic.write_json(
            out / "model.safetensors.index.json",
            {
                "metadata": {"total_size": sum(p.nbytes for p in plans)},
                "weight_map": {p.name: f for plan, f in zip(shards, names) for p in plan},
            },
        )
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    atomic.write_json(out / "config.json", d)
    atomic.write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
    )
    build_tokenizer(out)
    return sum(p.nbytes for p in plans) / 1e9


def write_trained(base: Path, out: Path, r: int = 16, alpha: int = 32, gate_scale: float = 0.05) -> None:
    """Adapter + gates + manifest per the trainer/baker contract, without instantiating the model."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    shapes = {
        "self_attn.qkv_proj": (3 * h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_up_proj": (2 * i, h),
        "mlp.down_proj": (h, i),
    }
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for n in range(layers):
        for mod, (o, k) in shapes.items():
            key = f"base_model.model.model.layers.{n}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(out)
    gates = {n: torch.randn(h // 8, 8, 8, generator=g) * gate_scale for n in range(layers)}
    so8.save_gates(out / so8.GATES_FILE, gates, h)
    m = manifest.build("train", {}, {}, "bench", time.time(), {"steps": 0})
    m.update(
        {
            "base_model": str(base),
            "base_model_sha256": None,
            "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": list(TARGETS)},
            "gates": {"layer_indices": sorted(gates), "init_scale": gate_scale, "hidden_size": h},
            "quantization": "none",
        }
    )
    manifest.write(out, m)


def run_bake(trained: Path, out: Path, dtype: str) -> tuple[float, dict]:
    """The real CLI in a child process (its manifest records its own peak RSS); returns wall seconds, manifest."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "services.baker", "--trained", str(trained), "--output", str(out), "--dtype", dtype],
        cwd=REPO,
        env={**os.environ, "SO8T_PROGRESS": "0"},
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"bake failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", choices=list(PRESETS), default=["small", "full"])
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--workdir", default=None, help="where the random base and the bake go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="so8t-bake-bench-"))
    rows = []
    try:
        for preset in args.preset:
            d = root / preset
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.time()
            gb = write_base(d / "base", preset)
            write_trained(d / "base", d / "final")
            gen_s = time.time() - t0
            print(f"[{preset}] random base {gb:.2f} GB written in {gen_s:.0f} s; baking…", file=sys.stderr, flush=True)
            wall, m = run_bake(d / "final", d / "baked", args.dtype)
            met = m["metrics"]
            v, t, rss = met["verification"], met["timings"], met["peak_rss_mib"]
            rows.append(
                {
                    "preset": preset,
                    "dims": "h{} L{} i{}".format(*[PRESETS[preset][k] for k in (0, 1, 3)]),
                    "base_gb": gb,
                    "out_gb": met["weights"]["bytes"] / 1e9,
                    "total_s": wall,
                    "check_s": wall - t["write_s"] - t["verify_s"],
                    "write_s": t["write_s"],
                    "verify_s": t["verify_s"],
                    "rss_write": rss["after_write"],
                    "rss_peak": rss["after_verify"],
                    "diff": v["baked_vs_gated"]["max_abs_logit_diff"],
                    "noise": (v["dtype_noise_vs_gated"] or {}).get("max_abs_logit_diff", 0.0),
                    "unrot": v["unrotated_vs_gated"]["max_abs_logit_diff"],
                    "top1": v["baked_vs_gated"]["top1_agreement"],
                }
            )
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"bake to {args.dtype} on {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    head = (
        f"{'preset':<6} {'dims':<16} {'base GB':>7} {'out GB':>6} {'total s':>7} {'check s':>7} {'write s':>7} "
        f"{'verify s':>8} {'RSS write MiB':>13} {'RSS peak MiB':>12} {'max|Δ|':>8} {'rounding':>8} "
        f"{'unrotated':>9} {'top-1':>6}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['preset']:<6} {r['dims']:<16} {r['base_gb']:>7.2f} {r['out_gb']:>6.2f} {r['total_s']:>7.0f} "
            f"{r['check_s']:>7.0f} {r['write_s']:>7.0f} {r['verify_s']:>8.0f} {r['rss_write']:>13.0f} "
            f"{r['rss_peak']:>12.0f} {r['diff']:>8.3g} {r['noise']:>8.3g} {r['unrot']:>9.3g} {r['top1']:>6.3f}"
        )


if __name__ == "__main__":
    main()
