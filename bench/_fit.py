"""Does a profile fit? One optimizer step of the real trainer pieces on one record that fills seq_len, unpacked.

    python bench/_fit.py --model DIR --seq 2048 --quant 8bit --r 64 --gates all --checkpointing reentrant --json F

The record is the longest the profile trains (a /think reply padded out to exactly `seq` tokens), so the figure is
the worst step of a real run, not the mean one of ~440-token example records. The model is the trainer's
(services.trainer.model.load_base: the quantisation, gradient checkpointing and peft's k-bit preparation; LoRA on
every target; gates; the Objective with PET), one forward + backward + optimizer step. Reported: wall seconds, peak
RSS, and on CUDA torch's max allocated and max reserved, the device's used memory at the peak as mem_get_info sees
it (torch's reserve + the CUDA context + anything else on the card), and a verdict against a 12 GB card.
`--checkpointing reentrant|non-reentrant` forces the mode (the trainer picks reentrant for a k-bit base).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CARD_12GB = 12 * 2**30  # an RTX 3060 / 4070: 12 GiB, of which the driver and display keep a little
USABLE = 0.96


def long_record(seq: int) -> dict:
    """A /think SFT record longer than `seq` tokens: the trainer truncates it to exactly seq_len, as it does a real
    long record (the loss still on the assistant tokens within it)."""
    from shared.think_format import Thinking, render_assistant, render_chat, system_prompt

    thinking = Thinking("依頼の内容を確認します。", "安全性を評価します。\n判定: ALLOW", "方針に従い回答します。")
    msgs = [
        {"role": "system", "content": system_prompt("simple")},
        {"role": "user", "content": "長い説明をしてください。"},
        {"role": "assistant", "content": render_assistant(thinking, "これは長い回答です。" * seq, "simple")},
    ]
    return {"id": "fill", "messages": msgs, "text": render_chat(msgs), "four_class_label": "ALLOW"}


def measure(args) -> dict:
    import torch

    from services.trainer import model as mdl
    from services.trainer.config import LoraSection, ModelSection, OptimSection
    from services.trainer.data import assistant_spans, collate, tokenize
    from services.trainer.gates import StepRotations, attach_gates
    from services.trainer.objective import Objective

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    reentrant = args.checkpointing == "reentrant"
    mdl.checkpointing_kwargs = lambda _cfg: {"use_reentrant": reentrant}
    cfg = ModelSection(
        base_model=args.model,
        quantization=args.quant,
        precision="bf16" if cuda else "fp32",
        gradient_checkpointing=True,
        attn_implementation="sdpa",
    )
    t0 = time.time()
    tok = mdl.load_tokenizer(args.model)
    ex = tokenize(tok, *assistant_spans(long_record(args.seq), "fill"), args.seq)
    if ex is None or len(ex.input_ids) != args.seq:
        raise SystemExit(f"the long record did not fill seq {args.seq}")
    ids, mask, labels = (t.to(device) for t in collate([ex], tok.pad_token_id))
    peft = mdl.add_lora(mdl.load_base(cfg, args.model, device), LoraSection(r=args.r, alpha=2 * args.r), args.model, 0)
    layers = None if args.gates == "all" else [int(i) for i in args.gates.split(",")] if args.gates != "none" else []
    gates = attach_gates(peft, None, layers, 0.05, seed=0) if layers != [] else {}
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = mdl.build_optimizer(OptimSection(), [{"params": params}], device)
    objective = Objective(peft, gates, True, 0.0)
    peft.train()
    load_s = time.time() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free0, total = torch.cuda.mem_get_info()
        outside_torch = (total - free0) - torch.cuda.memory_reserved()  # the CUDA context and other processes
    t0 = time.time()
    rot = objective.step = StepRotations(gates) if gates else None
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=cuda):
        lm_sum, pet, _, _ = objective(ids, mask, labels)
    (lm_sum / ex.n_targets + 0.01 * pet).backward()
    if rot is not None:
        rot.backward(1e-4)
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    out = {
        "model": args.model,
        "seq": int(ids.shape[1]),
        "quant": args.quant,
        "r": args.r,
        "gates": len(gates),
        "checkpointing": args.checkpointing,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "load_s": round(load_s, 1),
        "step_s": round(time.time() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loss": float(lm_sum / ex.n_targets),
    }
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        peak = reserved + outside_torch  # what the card held at the step's peak
        out.update(
            cuda_max_allocated_mib=round(allocated / 2**20),
            cuda_max_reserved_mib=round(reserved / 2**20),
            cuda_context_mib=round(outside_torch / 2**20),
            device_peak_mib=round(peak / 2**20),
            device_total_mib=round(total / 2**20),
            fits_12gb=peak <= CARD_12GB * USABLE,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quant", choices=["8bit", "4bit", "none"], default="8bit")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--gates", default="all", help="all, none, or layer indices (0,1,2)")
    ap.add_argument("--checkpointing", choices=["reentrant", "non-reentrant"], default="reentrant")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out = measure(args)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
