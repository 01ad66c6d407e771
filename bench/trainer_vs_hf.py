"""Our trainer against the one users would pick instead: transformers.Trainer + PEFT LoRA, same model and data.

    python bench/trainer_vs_hf.py                         # CPU: tiny and mid
    python bench/trainer_vs_hf.py --sizes phi35           # CUDA: Phi-3.5-mini dimensions, 8-bit, seq 2048
    python bench/trainer_vs_hf.py --sizes tiny --steps 3 --json out.json   # what bench/gpu.sh --dry-run runs

The dataset builder renders examples/four_class into /think SFT records (the tiny Phi-3's tokenizer; cycled to
steps × batch × accum records, one pass); every row trains on those records, in the same micro-batches and order
(our stream's first pass; the Trainer reads it sequentially), for the same optimizer steps with the same LoRA (r,
α, dropout, targets, initialisation), optimizer (AdamW; paged_adamw_8bit on CUDA), lr schedule (cosine, 10%
warm-up), clipping and seed, and the loss on the assistant tokens only:

- transformers.Trainer + PEFT, padded: DataCollatorForSeq2Seq pads each micro-batch to its longest record;
- transformers.Trainer + PEFT, padding-free: DataCollatorWithFlattening (what TRL's `padding_free` uses), each
  micro-batch's records flattened into one row with position_ids;
- ours (services/trainer: Run.build, Run.step) without gates, with gates, with packing, with gates + packing.
  Ours adds PET and, with gates, the SO(8) rotations and their regulariser (the real objective).

Each row runs in its own process, one after another (interleaved over --rounds), with the same thread count
(default 1: stable figures on a shared CPU). Step times exclude the first --warmup steps; records/s and real
tokens/s (padding excluded) are over the timed steps; peak RSS is the process's (CUDA: also max allocated);
final LM loss is the mean cross-entropy on the assistant tokens of the first --eval-records distinct records,
computed the same way for every row after training (and before, for reference). `--pet off` leaves PET out of
our rows (the Trainer rows have none).

Gate overhead: the rows give median step times with gates over without, but on a shared CPU two processes a few
minutes apart see different machines; `--gate-ab` measures it in one process instead: optimizer steps
alternating with the gates on and off on one model (packed rows), median over median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: hidden, layers, heads, intermediate, seq_len, quantization, LoRA r, batch, accum
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=256, layers=2, heads=4, inter=512, seq=1024, quant="none", r=16, batch=4, accum=1),
    "mid": dict(hidden=1024, layers=4, heads=16, inter=2816, seq=1024, quant="none", r=64, batch=4, accum=1),
    "phi35": dict(hidden=3072, layers=32, heads=32, inter=8192, seq=2048, quant="8bit", r=64, batch=1, accum=2),
}
# name: trainer, packing, gates
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "hf": ("transformers.Trainer + PEFT", "no (padded)", False),
    "hf-flat": ("transformers.Trainer + PEFT", "padding-free (flattened)", False),
    "ours": ("ours", "no (padded)", False),
    "ours+gates": ("ours", "no (padded)", True),
    "ours+packing": ("ours", "rows of <= seq_len", False),
    "ours+gates+packing": ("ours", "rows of <= seq_len", True),
}
SEED = 42


# --- setup (parent) -----------------------------------------------------------------------------------------------


def build_model(size: str, directory: Path) -> None:
    """Random weights of the size's dimensions + the tiny Phi-3 tokenizer (phi35: bf16 streamed to disk)."""
    from shared.tiny import build_tokenizer

    d = SIZES[size]
    if size == "phi35":
        from bake_memory import write_base  # noqa: PLC0415  (bench/ is on sys.path when run as a script)

        write_base(directory, "full")
        return
    import torch
    from transformers import Phi3ForCausalLM

    from shared.tiny import tiny_config

    torch.manual_seed(0)
    model = Phi3ForCausalLM._from_config(tiny_config(d["hidden"], d["layers"], d["heads"], d["inter"]))
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(directory)


def build_data(root: Path, n_records: int) -> tuple[Path, Path, int]:
    """examples/four_class through the dataset builder; train.jsonl cycled to n_records lines (one pass)."""
    from services.dataset.build import DatasetOptions, build

    build([str(REPO / "examples" / "four_class" / "*.jsonl")], root / "dataset", DatasetOptions())
    lines = (root / "dataset" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    out = root / "train.jsonl"
    out.write_text("\n".join(lines[k % len(lines)] for k in range(n_records)) + "\n", encoding="utf-8")
    return out, root / "dataset" / "train.jsonl", len(lines)


# --- the two trainers (child) ------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def lm_loss(objective, examples, pad_id: int, device) -> float:
    """Mean cross-entropy on the assistant tokens of `examples`, one record per forward, dropout off."""
    import torch

    from services.trainer.data import padded

    objective.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                lm_sum, *_ = objective(**padded([e], pad_id).to(device).inputs())
            total += float(lm_sum)
            n += e.n_targets
    objective.train()
    return total / n


def _config(spec: dict, packing: bool, gates: bool):
    from services.trainer.config import TrainConfig

    cuda = spec["cuda"]
    return TrainConfig.model_validate(
        {
            "model": {
                "base_model": spec["model_dir"],
                "quantization": spec["quant"],
                "precision": "bf16" if cuda else "fp32",
                "gradient_checkpointing": cuda,
                "attn_implementation": "sdpa",
            },
            "lora": {"r": spec["r"], "alpha": 2 * spec["r"], "dropout": 0.05},
            "gates": {"enabled": gates, "init_scale": 0.05, "orthogonal_reg": 1e-4},
            "pet": {"enabled": spec.get("pet", True)},
            "optim": {
                "optimizer": "paged_adamw_8bit" if cuda else "adamw_torch",
                "lr": spec["lr"],
                "scheduler": "cosine",
                "warmup_ratio": 0.1,
                "max_grad_norm": 1.0,
            },
            "train": {
                "epochs": 1,
                "max_steps": spec["steps"],
                "seq_len": spec["seq"],
                "batch_size": spec["batch"],
                "grad_accum": spec["accum"],
                "seed": SEED,
                "packing": packing,
            },
            "checkpoint": {"save_steps": 10**9, "save_minutes": None},
            "logging": {"log_steps": 10**9, "tensorboard": False},
        }
    )


def run_ours(spec: dict, packing: bool, gates: bool) -> dict:
    import torch

    from services.trainer import data
    from services.trainer import model as mdl
    from services.trainer.distributed import setup
    from services.trainer.loop import Run

    mdl.is_local = lambda _base: False  # skip hashing the base (it identifies checkpoints; the bench writes none)
    dist = setup()
    cfg = _config(spec, packing, gates)
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg, Path(spec["data"]), Path(out), dist)
        s = run.build()
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        evals = data.load(spec["eval_data"], s.tokenizer, spec["seq"], None, SEED).examples[: spec["eval_records"]]
        before = lm_loss(s.objective, evals, s.tokenizer.pad_token_id, dist.device)
        times, cpu, tokens, records, forwards, position = [], [], [], [], [], 0
        for step in range(s.total):
            _sync(dist.device)
            t0, c0 = time.perf_counter(), time.process_time()
            v = run.step(s, step, position)
            _sync(dist.device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            tokens.append(v["tokens"])
            records.append(v["records"])
            forwards.append(v["forwards"])
            position += cfg.train.grad_accum * dist.world
        after = lm_loss(s.objective, evals, s.tokenizer.pad_token_id, dist.device)
        width = [int(b.input_ids.numel()) for b in _all_batches(s, cfg)]
    return _result(dist.device, times, cpu, tokens, records, forwards, before, after, sum(width))


def _all_batches(s, cfg):
    """The run's forwards again (cheap: tensors only), to count padded positions."""
    from services.trainer import data

    out = []
    for step in range(s.total):
        groups = [
            [s.data.examples[i] for i in s.order.micro_batch(step * cfg.train.grad_accum + k)]
            for k in range(cfg.train.grad_accum)
        ]
        out += data.micro_batches(groups, cfg.train.packing, cfg.train.seq_len, s.tokenizer.pad_token_id)
    return out


def run_hf(spec: dict, flatten: bool) -> dict:
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from services.trainer import data
    from services.trainer.distributed import setup
    from services.trainer.model import add_lora, load_base
    from services.trainer.objective import Objective

    device = setup().device
    cfg = _config(spec, False, False)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(SEED)
    peft = add_lora(load_base(cfg.model, spec["model_dir"], device), cfg.lora, spec["model_dir"], SEED)
    loaded = data.load(spec["data"], tok, spec["seq"], None, SEED).examples
    # our stream's first pass, read sequentially: the same records in the same micro-batches, step by step
    examples = [loaded[i] for i in data.Order(len(loaded), spec["batch"], SEED).permutation(0)]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    evals = data.load(spec["eval_data"], tok, spec["seq"], None, SEED).examples[: spec["eval_records"]]
    probe = Objective(peft, {}, pet_enabled=False, huber_delta=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = lm_loss(probe, evals, tok.pad_token_id, device)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if not self.times and not self.t0:
                _sync(device)
                self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            now, cnow = time.perf_counter(), time.process_time()
            self.times.append(now - self.t0)  # from the previous step's end: batch fetching included, as ours
            self.cpu.append(cnow - self.c0)
            self.t0, self.c0 = now, cnow

    timer = Timer()
    collator = (
        DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        if flatten
        else DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    )
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=spec["accum"],
            max_steps=spec["steps"],
            learning_rate=spec["lr"],
            lr_scheduler_type="cosine",
            warmup_steps=math.ceil(0.1 * spec["steps"]),  # as ours (services.trainer.model.build_scheduler)
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="paged_adamw_8bit" if cuda else "adamw_torch",
            bf16=cuda,
            use_cpu=not cuda,
            logging_steps=10**9,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            seed=SEED,
        )
        trainer = Trainer(model=peft, args=args, train_dataset=features, data_collator=collator, callbacks=[timer])
        trainer.train()
    after = lm_loss(probe, evals, tok.pad_token_id, device)
    per_step = spec["batch"] * spec["accum"]
    tokens = [sum(len(e.input_ids) for e in examples[k * per_step : (k + 1) * per_step]) for k in range(spec["steps"])]
    width = _hf_width(examples, spec, flatten)
    return _result(
        device,
        timer.times,
        timer.cpu,
        tokens,
        [per_step] * len(timer.times),
        [spec["accum"]] * len(timer.times),
        before,
        after,
        width,
    )


def _hf_width(examples, spec: dict, flatten: bool) -> int:
    """Positions HF computes over the run (padding included): micro-batches of `batch` records in order."""
    lens = [len(e.input_ids) for e in examples]
    b = spec["batch"]
    if flatten:
        return sum(lens)
    return sum(max(lens[i : i + b]) * len(lens[i : i + b]) for i in range(0, len(lens), b))


def _result(device, times, cpu, tokens, records, forwards, before, after, width) -> dict:
    import torch

    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "step_s": times,
        "step_cpu_s": cpu,  # process CPU time: less sensitive than wall time to other work on a shared machine
        "tokens": tokens,
        "records": records,
        "forwards": forwards,
        "lm_before": before,
        "lm_after": after,
        "positions": width,
        "real_tokens_total": sum(tokens),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_gate_ab(spec: dict, steps: int) -> dict:
    """The gate's cost, measured where a shared machine's noise cancels: one process, one model, optimizer steps
    alternating with the gates on and off (hooks removed, no rotations, no regulariser), packed rows."""
    import torch

    from services.trainer import model as mdl
    from services.trainer.distributed import setup
    from services.trainer.gates import attention_modules
    from services.trainer.loop import Run

    mdl.is_local = lambda _base: False
    dist = setup()
    cfg = _config(dict(spec, steps=steps + 2), packing=True, gates=True)
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg, Path(spec["data"]), Path(out), dist)
        s = run.build()
        gates, attn = dict(s.gates), attention_modules(s.peft)

        def switch(on: bool) -> None:
            for i, g in gates.items():
                g.unhook()
                if on:
                    g.hook_input_of(attn[i].o_proj)
            s.gates = s.objective._gates = gates if on else {}

        times: dict[str, list[float]] = {"on_wall": [], "on_cpu": [], "off_wall": [], "off_cpu": []}
        position = 0
        for step in range(steps + 2):
            on = step % 2 == 0
            switch(on)
            _sync(dist.device)
            t0, c0 = time.perf_counter(), time.process_time()
            run.step(s, step, position)
            _sync(dist.device)
            if step >= 2:  # one warm-up step each way
                times["on_wall" if on else "off_wall"].append(time.perf_counter() - t0)
                times["on_cpu" if on else "off_cpu"].append(time.process_time() - c0)
            position += cfg.train.grad_accum * dist.world
    return dict(times, threads=torch.get_num_threads())


def child(variant: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if variant.startswith("hf"):
        return run_hf(spec, flatten=variant == "hf-flat")
    if variant.startswith("gate-ab:"):
        return run_gate_ab(spec, int(variant.split(":")[1]))
    return run_ours(spec, packing="packing" in variant, gates="gates" in variant)


# --- parent: run the rows, print the table ----------------------------------------------------------------------


def summarise(size: str, variant: str, runs: list[dict], warmup: int) -> dict:
    times = [t for r in runs for t in r["step_s"][warmup:]]
    recs = sum(n for r in runs for n in r["records"][warmup:])
    toks = sum(n for r in runs for n in r["tokens"][warmup:])
    trainer, packing, gates = VARIANTS[variant]
    row = {
        "size": size,
        "variant": variant,
        "trainer": trainer,
        "packing": packing,
        "gates": gates,
        "device": runs[0]["device"],
        "threads": runs[0]["threads"],
        "timed_steps": len(times),
        "median_step_s": statistics.median(times),
        "median_step_cpu_s": statistics.median(t for r in runs for t in r["step_cpu_s"][warmup:]),
        "records_per_s": recs / sum(times),
        "real_tokens_per_s": toks / sum(times),
        "forwards_per_step": statistics.mean(f for r in runs for f in r["forwards"]),
        "padding_share": 1 - runs[0]["real_tokens_total"] / runs[0]["positions"] if runs[0]["positions"] else 0.0,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "lm_before": runs[0]["lm_before"],
        "lm_after": statistics.mean(r["lm_after"] for r in runs),
    }
    if "cuda_max_allocated_mib" in runs[0]:
        row["cuda_max_allocated_mib"] = max(r["cuda_max_allocated_mib"] for r in runs)
    return row


def print_table(rows: list[dict], spec_by_size: dict[str, dict]) -> None:
    by = {(r["size"], r["variant"]): r for r in rows}
    for size in dict.fromkeys(r["size"] for r in rows):
        sp = spec_by_size[size]
        d = SIZES[size]
        print(
            f"\n{size}: hidden {d['hidden']}, {d['layers']} layers, LoRA r {d['r']}, {sp['quant']}, seq_len "
            f"{sp['seq']}, batch {sp['batch']} × accum {sp['accum']}, {sp['steps']} steps ({sp['warmup']} warm-up "
            f"untimed), {sp['records']} records (~{sp['mean_tokens']:.0f} tokens each), lr {sp['lr']:g}, "
            f"{sp['device']}, {sp['threads']} thread(s), {sp['rounds']} round(s)"
        )
        cuda = any("cuda_max_allocated_mib" in r for r in rows if r["size"] == size)
        mem = "peak RSS / CUDA max allocated" if cuda else "peak RSS"
        print(f"| trainer | packing | gates | records/s | real tokens/s (padding excluded) | {mem} | final LM loss |")
        print("|---|---|---|--:|--:|--:|--:|")
        base = by.get((size, "hf"))
        for r in rows:
            if r["size"] != size:
                continue
            speed = f" ({r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}×)" if base else ""
            peak = f"{r['peak_rss_mib'] / 1024:.2f} GiB"
            if "cuda_max_allocated_mib" in r:
                peak += f" / {r['cuda_max_allocated_mib'] / 1024:.2f} GiB"
            print(
                f"| {r['trainer']} | {r['packing']} | {'yes' if r['gates'] else 'no'} | {r['records_per_s']:.2f} | "
                f"{r['real_tokens_per_s']:,.0f}{speed} | {peak} | {r['lm_after']:.4f} |"
            )
        print(
            f"\n| {size}: row | median step s (wall / CPU) | forwards/step | padding share | LM loss before → after |"
        )
        print("|---|--:|--:|--:|--:|")
        for r in rows:
            if r["size"] == size:
                print(
                    f"| {r['variant']} | {r['median_step_s']:.3f} / {r['median_step_cpu_s']:.3f} | "
                    f"{r['forwards_per_step']:.2f} | "
                    f"{100 * r['padding_share']:.1f}% | {r['lm_before']:.4f} → {r['lm_after']:.4f} |"
                )
        for plain, gated in (("ours", "ours+gates"), ("ours+packing", "ours+gates+packing")):
            a, b = by.get((size, plain)), by.get((size, gated))
            if a and b:
                wall = 100 * (b["median_step_s"] / a["median_step_s"] - 1)
                cpu = 100 * (b["median_step_cpu_s"] / a["median_step_cpu_s"] - 1)
                print(
                    f"gate overhead ({plain} → {gated}): median step {a['median_step_s']:.3f} → "
                    f"{b['median_step_s']:.3f} s wall ({wall:+.1f}%), {a['median_step_cpu_s']:.3f} → "
                    f"{b['median_step_cpu_s']:.3f} s CPU ({cpu:+.1f}%); medians of {a['timed_steps']} and "
                    f"{b['timed_steps']} steps"
                )


def spawn(size: str, variant: str, spec: dict, threads: int) -> dict:
    """One child process (its own peak memory), its RESULT line parsed."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, SO8T_PROGRESS="0", OMP_NUM_THREADS=str(threads)),
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{size}/{variant} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"[{size}] {variant}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=26, help="optimizer steps per row (all rows the same)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timings")
    ap.add_argument("--batch", type=int, default=None, help="records per micro-batch (default: per size)")
    ap.add_argument("--accum", type=int, default=None, help="gradient accumulation (default: per size)")
    ap.add_argument("--seq-len", type=int, default=None, help="seq_len, the packed rows' bound (default: per size)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument(
        "--pet",
        choices=("on", "off"),
        default="on",
        help="PET in our rows (on: our objective; off: the LM loss alone, as the transformers.Trainer rows)",
    )
    ap.add_argument("--eval-records", type=int, default=16, help="distinct records the final LM loss is taken on")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per row, interleaved (row A, row B, …, A, B, …)")
    ap.add_argument(
        "--gate-ab",
        type=int,
        default=48,
        metavar="STEPS",
        help="also measure the gates' cost in one process, STEPS optimizer steps alternating gates on/off (0: skip)",
    )
    ap.add_argument("--json", default=None, help="also write the rows and settings to this file")
    ap.add_argument("--workdir", default=None, help="where the models and data go (default: a temp dir)")
    ap.add_argument(
        "--model-dir",
        default=None,
        help="an existing model of the (single) size's dimensions with a tokenizer, instead of building one "
        "(bench/gpu.sh shares one random Phi-3.5-sized base between this and the bake)",
    )
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], json.loads(args.child[1]))), flush=True)
        return

    import torch

    if args.model_dir and len(args.sizes) != 1:
        sys.exit("--model-dir goes with exactly one size")
    cuda = torch.cuda.is_available()
    if "phi35" in args.sizes and not cuda:
        sys.exit("--sizes phi35 needs CUDA (8-bit Phi-3.5-mini dimensions)")
    load_before = os.getloadavg()
    rows, specs, ab = [], {}, {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        for size in args.sizes:
            d = SIZES[size]
            batch, accum = args.batch or d["batch"], args.accum or d["accum"]
            n_records = args.steps * batch * accum
            model_dir = Path(args.model_dir) if args.model_dir else root / f"model-{size}"
            print(f"[{size}] building the random model and the data…", file=sys.stderr, flush=True)
            if not args.model_dir:
                build_model(size, model_dir)
            train, distinct, n_distinct = build_data(root / f"data-{size}", n_records)
            from transformers import AutoTokenizer

            from services.trainer.data import load

            seq = args.seq_len or d["seq"]
            lens = [len(e.input_ids) for e in load(train, AutoTokenizer.from_pretrained(model_dir), seq).examples]
            spec = {
                "model_dir": str(model_dir),
                "data": str(train),
                "eval_data": str(distinct),
                "eval_records": min(args.eval_records, n_distinct),
                "quant": d["quant"],
                "r": d["r"],
                "seq": seq,
                "batch": batch,
                "accum": accum,
                "steps": args.steps,
                "lr": args.lr,
                "threads": args.threads,
                "cuda": cuda,
                "pet": args.pet == "on",
            }
            specs[size] = dict(
                spec,
                warmup=args.warmup,
                records=n_records,
                mean_tokens=sum(lens) / len(lens),
                device="cuda" if cuda else "cpu",
                rounds=args.rounds,
            )
            results: dict[str, list[dict]] = {}
            for k in range(args.rounds):
                for variant in args.variants:
                    print(f"[{size}] round {k + 1}/{args.rounds}: {variant}…", file=sys.stderr, flush=True)
                    results.setdefault(variant, []).append(spawn(size, variant, spec, args.threads))
            rows += [summarise(size, v, runs, args.warmup) for v, runs in results.items()]
            if args.gate_ab:
                print(f"[{size}] gates on/off, interleaved in one process…", file=sys.stderr, flush=True)
                ab[size] = spawn(size, f"gate-ab:{args.gate_ab}", spec, args.threads)
    load_after = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print_table(rows, specs)
    for size, t in ab.items():
        med = {k: statistics.median(v) for k, v in t.items() if k != "threads"}
        t["overhead_wall"] = med["on_wall"] / med["off_wall"] - 1
        t["overhead_cpu"] = med["on_cpu"] / med["off_cpu"] - 1
        print(
            f"{size}: gate overhead, {len(t['on_wall'])} steps with gates interleaved with {len(t['off_wall'])} "
            f"without in one process (packed rows): median {med['off_wall']:.3f} → {med['on_wall']:.3f} s wall "
            f"({100 * t['overhead_wall']:+.1f}%), {med['off_cpu']:.3f} → {med['on_cpu']:.3f} s CPU "
            f"({100 * t['overhead_cpu']:+.1f}%)"
        )
    if args.json:
        doc = {"rows": rows, "settings": specs, "gate_ab": ab, "load_average": [load_before, load_after]}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
