"""Merge the LoRA adapter and fold the SO(8) rotations into o_proj; verify the stock model by reloading it."""

from __future__ import annotations

import argparse

from services.baker.options import BakeOptions
from shared import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trained",
        required=True,
        metavar="DIR",
        help="the trainer's final artifact (<run>/train/final: adapter, so8t_gates.safetensors, manifest)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="baked model directory (replaced atomically)")
    p.add_argument(
        "--base",
        default=None,
        metavar="NAME_OR_DIR",
        help="base model (hub id or directory); default: base_model from the trained manifest",
    )
    flags.add(p, BakeOptions)
    p.add_argument("--force", action="store_true", help="bake even when the manifest says the output is up to date")


def _summary(m: dict) -> str:
    v = m["metrics"]["verification"]
    rows = [("baked vs trained", v["baked_vs_gated"]), ("un-rotated merge vs trained", v["unrotated_vs_gated"])]
    if v["dtype_noise_vs_gated"]:
        rows.append((f"{m['config']['dtype']} rounding alone", v["dtype_noise_vs_gated"]))
    lines = [f"{'logits (float32, ' + str(v['prompts']) + ' prompts)':<34} {'max|Δ|':>10} {'KL mean':>10} {'top-1':>7}"]
    for name, r in rows:
        lines.append(f"{name:<34} {r['max_abs_logit_diff']:>10.3g} {r['kl_mean']:>10.3g} {r['top1_agreement']:>7.2%}")
    b = v["bounds"]
    lines.append(f"{'bounds':<34} {b['max_abs_logit_diff']:>10.3g} {b['kl_mean']:>10.3g}")
    w, t = m["metrics"]["weights"], m["metrics"]["timings"]
    lines.append(
        f"{w['tensors']} tensors, {w['bytes'] / 2**20:.1f} MiB {m['config']['dtype']} in {len(w['files'])} "
        f"shard(s); {w['lora_merged']} LoRA merges, {w['rotations_folded']} rotations folded; "
        f"write {t['write_s']} s, verify {t['verify_s']} s; peak RSS {m['metrics']['peak_rss_mib']} MiB"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from services.baker.bake import bake

    result = bake(args.trained, args.output, flags.parse(BakeOptions, args), base=args.base, force=args.force)
    if result.skipped:
        print(f"{result.output}: up to date (manifest matches inputs), skipped")
    else:
        print(_summary(result.manifest))
        print(f"written to {result.output}")
    return 0
