"""bench/gpu.sh's Python side: the shared random base, the bake figures, and the one table (+ JSON) at the end.

    python bench/_gpu.py base   --preset full|tiny --out DIR
    python bench/_gpu.py bake   --base DIR --work DIR --dtype bfloat16 --json FILE
    python bench/_gpu.py report --dir OUT [--dry-run] [--seconds N]

The base and the trained artifact come from bench/bake_memory.py (random weights of the real dimensions, streamed
to disk; LoRA r 16 on every target and gates on every layer); the bake is the real CLI in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def cmd_base(args) -> None:
    from bake_memory import write_base

    t0 = time.time()
    gb = write_base(Path(args.out), args.preset)
    print(f"random {args.preset} base: {gb:.2f} GB in {time.time() - t0:.0f} s", file=sys.stderr)


def cmd_bake(args) -> None:
    import bake_memory

    from services.trainer import artifact
    from shared import so8

    if not hasattr(so8, "GATES_FILE"):  # bake_memory.write_trained still names the file by the old constant
        so8.GATES_FILE = artifact.GATES  # type: ignore[attr-defined]
    work = Path(args.work)
    bake_memory.write_trained(Path(args.base), work / "final")
    wall, m = bake_memory.run_bake(work / "final", work / "baked", args.dtype)
    met = m["metrics"]
    v, t = met["verification"], met["timings"]
    out = {
        "dtype": args.dtype,
        "total_s": wall,
        "write_s": t["write_s"],
        "verify_s": t["verify_s"],
        "verify_device": v.get("device", "cpu"),
        "verify_cuda_peak_mib": v.get("cuda_peak_mib"),
        "peak_rss_mib": met["peak_rss_mib"],
        "max_abs_logit_diff": v["baked_vs_gated"]["max_abs_logit_diff"],
        "rounding_alone": (v["dtype_noise_vs_gated"] or {}).get("max_abs_logit_diff"),
        "unrotated": v["unrotated_vs_gated"]["max_abs_logit_diff"],
        "top1": v["baked_vs_gated"]["top1_agreement"],
        "kl_mean": v["baked_vs_gated"]["kl_mean"],
        "passed": v["passed"],
    }
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"


def _gib(mib: float | None) -> str:
    return f"{mib / 1024:.2f} GiB" if mib is not None else "-"


def fit_rows(out: Path) -> tuple[list[dict], list[str]]:
    """The fit-<profile>-<mode>.json figures as table rows, and one verdict line per profile (reentrant: what the
    trainer runs)."""
    rows, verdicts = [], []
    for path in sorted(out.glob("fit-*.json")):
        f = json.loads(path.read_text())
        profile, mode = path.stem.split("-", 2)[1:]
        if f.get("failed"):
            rows.append(
                {
                    "measurement": f"fit {profile}: one step, {mode}",
                    "gates": "-",
                    "packing": "no",
                    "seconds": "-",
                    "real_tokens_per_s": "-",
                    "gpu_memory": "-",
                    "peak_rss": "-",
                    "result": "FAILED (out of memory or error: see the log)",
                }
            )
            if mode == "reentrant":
                verdicts.append(f"{profile}: fits 12 GB: no (the step failed)")
            continue
        cuda = "device_peak_mib" in f
        mem = (
            (
                f"{_gib(f['cuda_max_allocated_mib'])} alloc / {_gib(f['cuda_max_reserved_mib'])} reserved / "
                f"{_gib(f['device_peak_mib'])} on the card"
            )
            if cuda
            else "-"
        )
        rows.append(
            {
                "measurement": f"fit {profile}: one step on a {f['seq']}-token record, {mode} checkpointing",
                "gates": f"{f['gates']} layers",
                "packing": "no",
                "seconds": f"{f['step_s']:.2f} / step",
                "real_tokens_per_s": f"{f['seq'] / f['step_s']:,.0f}",
                "gpu_memory": mem,
                "peak_rss": _gib(f["peak_rss_mib"]),
                "result": f"LM loss {f['loss']:.4f}",
            }
        )
        if mode == "reentrant":
            fits = ("yes" if f["fits_12gb"] else "no") if cuda else "n/a (no GPU)"
            peak = _gib(f["device_peak_mib"]) if cuda else f"RSS {_gib(f['peak_rss_mib'])}"
            verdicts.append(
                f"{profile} (seq {f['seq']}, r {f['r']}, {f['gates']} gated layers): fits 12 GB: {fits}, peak {peak}"
            )
    return rows, verdicts


def cmd_report(args) -> None:
    out = Path(args.dir)
    trainer = json.loads((out / "trainer.json").read_text())
    bake = json.loads((out / "bake.json").read_text())
    rows = []
    for r in trainer["rows"]:
        mem = r.get("cuda_max_allocated_mib")
        rows.append(
            {
                "measurement": f"train: {r['trainer']}",
                "gates": "yes" if r["gates"] else "no",
                "packing": r["packing"],
                "seconds": f"{r['median_step_s']:.3f} / step",
                "real_tokens_per_s": f"{r['real_tokens_per_s']:,.0f}",
                "gpu_memory": f"{mem / 1024:.2f} GiB" if mem is not None else "-",
                "peak_rss": f"{r['peak_rss_mib'] / 1024:.2f} GiB",
                "result": f"LM loss {r['lm_before']:.4f} → {r['lm_after']:.4f}",
            }
        )
    for t in trainer.get("gate_ab", {}).values():
        rows.append(
            {
                "measurement": "train: ours, gates on/off alternating in one process",
                "gates": "on / off",
                "packing": "rows of <= seq_len",
                "seconds": f"{len(t['on_wall'])} + {len(t['off_wall'])} steps",
                "real_tokens_per_s": "-",
                "gpu_memory": "-",
                "peak_rss": "-",
                "result": (
                    f"gate overhead {100 * t['overhead_wall']:+.1f}% (wall), {100 * t['overhead_cpu']:+.1f}% (CPU)"
                ),
            }
        )
    fits, verdicts = fit_rows(out)
    rows += fits
    peak = bake["verify_cuda_peak_mib"]
    rows.append(
        {
            "measurement": f"bake {bake['dtype']}, verification on {bake['verify_device']}",
            "gates": "yes",
            "packing": "-",
            "seconds": f"{bake['total_s']:.0f} total, {bake['write_s']:.0f} write, {bake['verify_s']:.0f} verify",
            "real_tokens_per_s": "-",
            "gpu_memory": f"{peak / 1024:.2f} GiB" if peak is not None else "-",
            "peak_rss": f"{bake['peak_rss_mib']['after_verify'] / 1024:.2f} GiB",
            "result": (
                f"{'passed' if bake['passed'] else 'FAILED'}: max|Δlogit| {bake['max_abs_logit_diff']:.3g} "
                f"(rounding alone {bake['rounding_alone'] or 0:.3g}, unrotated {bake['unrotated']:.3g}), "
                f"top-1 {bake['top1']:.3f}"
            ),
        }
    )
    settings = next(iter(trainer["settings"].values()))
    head = (
        f"bench/gpu.sh{' --dry-run' if args.dry_run else ''}: GPU {_gpu()}, {platform.node()}; trainer: "
        f"seq_len {settings['seq']}, batch {settings['batch']} × accum {settings['accum']}, {settings['steps']} "
        f"steps ({settings['warmup']} untimed), {settings['quant']}, gradient checkpointing "
        f"{'on' if settings['cuda'] else 'off'}"
    )
    cols = ["measurement", "gates", "packing", "seconds", "real_tokens_per_s", "gpu_memory", "peak_rss", "result"]
    print(head)
    print("| " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print()
    for line in verdicts:
        print(f"- {line}")
    if args.seconds is not None:
        print(f"- bench/gpu.sh took {args.seconds // 60} min {args.seconds % 60} s")
    doc = {
        "verdicts": verdicts,
        "seconds": args.seconds,
        "dry_run": args.dry_run,
        "gpu": _gpu(),
        "host": platform.node(),
        "load_average": os.getloadavg(),
        "table": rows,
        "trainer": trainer,
        "bake": bake,
    }
    (out / "gpu.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"written: {out / 'gpu.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("--preset", required=True)
    b.add_argument("--out", required=True)
    k = sub.add_parser("bake")
    k.add_argument("--base", required=True)
    k.add_argument("--work", required=True)
    k.add_argument("--dtype", default="bfloat16")
    k.add_argument("--json", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--seconds", type=int, default=None, help="the whole run's duration, for the table's foot")
    args = ap.parse_args()
    {"base": cmd_base, "bake": cmd_bake, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
