"""Where each optimizer step's figures go: the progress bar, TensorBoard, a readable log line every log_steps.

Only the main process writes; the other ranks get a sink that does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from services.trainer.config import LoggingSection
from shared import logs
from shared.pet import PetSchedule

log = logs.get("trainer")
_SCALARS = {
    "loss/total": "total",
    "loss/lm": "lm",
    "loss/pet": "pet",
    "loss/ortho": "ortho",
    "pet/lambda": "lambda",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "train/tokens_per_s": "tokens_per_s",
    "train/token_accuracy": "accuracy",
}


def fmt_losses(v: dict[str, Any]) -> str:
    return (
        f"loss {v['total']:.4f} lm {v['lm']:.4f} pet {v['pet']:.4g} ortho {v['ortho']:.2e} "
        f"λ {v['lambda']:g} ({v['phase']}) lr {v['lr']:.2e} gn {v['grad_norm']:.3f} {v['tokens_per_s']:.0f} tok/s"
    )


class MetricsSink:
    def __init__(self, cfg: LoggingSection, out_dir: Path, pet: PetSchedule, start: int, total: int, main: bool):
        self.cfg, self.pet, self.total, self.main = cfg, pet, total, main
        self.bar = logs.progress(total=total, desc="train", unit="step") if main else None
        if self.bar is not None:
            self.bar.update(start)
        self.writer = None
        if main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
        self.window_tokens, self.window_start = 0, time.time()

    def step(self, step: int, v: dict[str, Any]) -> None:
        """Record the figures of optimizer step `step` (1-based)."""
        if not self.main:
            return
        self.window_tokens += v["tokens"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(fmt_losses(v), refresh=False)
        if self.writer is not None:
            for tag, key in _SCALARS.items():
                self.writer.add_scalar(tag, v[key], step)
            self.writer.add_scalar("pet/phase", self.pet.phase_index(step - 1), step)
            if "val_lm" in v:
                self.writer.add_scalar("val/lm_loss", v["val_lm"], step)
            for key in ("format", "label_accuracy"):
                if f"val_{key}" in v:
                    self.writer.add_scalar(f"val/{key}", v[f"val_{key}"], step)
        if "val_lm" in v:
            log.info("step %d/%d validation: lm %.4f (train lm %.4f)", step, self.total, v["val_lm"], v["lm"])
        if "val_format" in v:
            log.info(
                "step %d/%d replies: format %.2f, verdict right %.2f",
                step,
                self.total,
                v["val_format"],
                v["val_label_accuracy"],
            )
        if step % self.cfg.log_steps == 0 or step == self.total:
            rate = self.window_tokens / max(time.time() - self.window_start, 1e-9)
            self.window_tokens, self.window_start = 0, time.time()
            log.info(
                "step %d/%d %s acc %.3f (%.0f tok/s since last log)",
                step,
                self.total,
                fmt_losses(v),
                v["accuracy"],
                rate,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
