"""The training run: resume or start, loop over optimizer steps, checkpoint, write the final artifact.

Per optimizer step the global window is `grad_accum × world_size` micro-batches of the data stream; rank r
takes every world_size-th one. Losses are normalised over the window, so one process with accumulation a·w
and w DDP processes with accumulation a compute the same update:

    total = LM + λ(step)·PET + orthogonal_reg·ortho
    LM    = Σ token cross-entropy over assistant tokens in the window / their count
    PET   = mean over the window's micro-batches of shared.pet.pet_loss(last hidden states, attention mask)
    ortho = mean over gated layers of mean ‖RᵀR − I‖²

Exact resume: everything that decides the next update is in the checkpoint (adapter, gates, optimizer,
scheduler, grad scaler, every rank's RNG states, the step and the stream position), and nothing about the
trajectory depends on when checkpoints are taken.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.trainer import artifact, checkpoint, data, model as mdl
from services.trainer.config import TrainConfig
from services.trainer.distributed import Dist, fingerprint
from services.trainer.gates import attach_gates, clear_rotations, gate_tensors
from services.trainer.objective import Objective
from shared import atomic, logs, manifest
from shared.config import ConfigError
from shared.pet import Phase, PetSchedule
from shared.so8 import GATES_FILE, load_gates

log = logs.get("trainer")
SESSION_EVERY_S = 5.0


class ResumeError(RuntimeError):
    """The newest good checkpoint cannot continue this run (other config, dataset or base model)."""


@dataclass
class Result:
    final: Path
    skipped: bool
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fmt_losses(v: dict[str, float]) -> str:
    return (f"loss {v['total']:.4f} lm {v['lm']:.4f} pet {v['pet']:.4g} ortho {v['ortho']:.2e} "
            f"λ {v['lambda']:g} ({v['phase']}) lr {v['lr']:.2e} gn {v['grad_norm']:.3f} {v['tokens_per_s']:.0f} tok/s")


class Run:
    """One training session (a fresh start or a resume) of one process."""

    def __init__(self, cfg: TrainConfig, dataset: Path, out_dir: Path, dist: Dist):
        self.cfg, self.dataset, self.out, self.dist = cfg, dataset, out_dir, dist
        self.ckpt_root = out_dir / "checkpoints"
        self.final_dir = out_dir / "final"
        self.base = cfg.model.base_model
        if not self.base:
            raise ConfigError("model.base_model: no base model (set it in the config or pass --base-model)")
        self.digest = cfg.training_digest()
        self.started = time.time()

    # --- setup -----------------------------------------------------------------------------------------------

    def hashes(self) -> None:
        self.inputs = {"dataset": manifest.describe_input(self.dataset)}
        self.base_sha = None
        if mdl.is_local(self.base):
            self.base_sha = self.dist.broadcast(manifest.sha256_tree(self.base) if self.dist.main else None)

    def build(self) -> None:
        cfg, dev = self.cfg, self.dist.device
        seed_everything(cfg.train.seed)
        self.tokenizer = mdl.load_tokenizer(self.base)
        self.data = data.load(self.dataset, self.tokenizer, cfg.train.seq_len, cfg.train.sample, cfg.train.seed)
        self.order = data.Order(len(self.data.examples), cfg.train.batch_size, cfg.train.seed)
        self.accum, world = cfg.train.grad_accum, self.dist.world
        self.total = data.total_steps(self.order.per_epoch, cfg.train.epochs, world, self.accum, cfg.train.max_steps)
        self.pet = PetSchedule(self.total, [Phase(p.name, p.fraction, p.weight) for p in cfg.pet.phases])
        log.info("data: %d records (%d tokens, %d truncated, %d skipped) from %s; %d steps of %d×%d×%d sequences",
                 len(self.data.examples), self.data.tokens, self.data.truncated, self.data.dropped, self.dataset,
                 self.total, cfg.train.batch_size, self.accum, world)

        base_model = mdl.load_base(cfg.model, self.base, dev)
        self.peft = mdl.add_lora(base_model, cfg.lora, self.base, cfg.train.seed)
        self.gates = {}
        if cfg.gates.enabled:
            self.gates = attach_gates(self.peft, None, cfg.gates.layer_indices, cfg.gates.init_scale,
                                      seed=cfg.train.seed)
        self.hidden = base_model.config.hidden_size
        gate_params = [g.A for g in self.gates.values()]
        gate_ids = {id(p) for p in gate_params}
        lora_params = [p for p in self.peft.parameters() if p.requires_grad and id(p) not in gate_ids]
        self.trainable = lora_params + gate_params
        groups = [{"params": lora_params, "weight_decay": cfg.optim.weight_decay}]
        if gate_params:
            groups.append({"params": gate_params, "weight_decay": 0.0})  # decay would pull rotations to identity
        self.optimizer = mdl.build_optimizer(cfg.optim, groups, dev)
        self.scheduler = mdl.build_scheduler(cfg.optim, self.optimizer, self.total)
        self.amp_dtype = mdl.compute_dtype(cfg.model, dev)
        self.use_amp = dev.type == "cuda" and self.amp_dtype != torch.float32
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        objective = Objective(self.peft, self.gates, cfg.pet.enabled, cfg.pet.huber_delta)
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            self.forward = DDP(objective, device_ids=ids)
        else:
            self.forward = objective
        n_lora = sum(p.numel() for p in lora_params)
        n_gate = sum(p.numel() for p in gate_params)
        log.info("model: %s (%s, %s), LoRA r=%d α=%g on %s: %d params; gates on layers %s: %d params; device %s",
                 self.base, cfg.model.quantization, str(self.amp_dtype).replace("torch.", ""), cfg.lora.r,
                 cfg.lora.alpha, ",".join(cfg.lora.target_modules), n_lora, sorted(self.gates) or "none", n_gate, dev)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _state_json(self, step: int, position: int, last: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step, "data_position": position, "total_steps": self.total,
            "epoch": round(self.order.epoch_of(position), 4), "world_size": self.dist.world,
            "training_digest": self.digest, "dataset_sha256": self.inputs["dataset"]["sha256"],
            "base_model": self.base, "base_model_sha256": self.base_sha, "losses": last,
        }

    def save_checkpoint(self, step: int, position: int, last: dict[str, Any]) -> Path | None:
        rngs = self.dist.gather(checkpoint.rng_state())
        path = None
        if self.dist.main:
            def fill(tmp: Path) -> None:
                artifact.save_adapter(self.peft, tmp)
                artifact.save_gate_file(tmp, gate_tensors(self.gates), self.hidden)
                torch.save(self.optimizer.state_dict(), tmp / checkpoint.OPTIMIZER)
                torch.save({"scheduler": self.scheduler.state_dict(),
                            "scaler": self.scaler.state_dict() if self.scaler else None,
                            "rng": rngs}, tmp / checkpoint.STATE_PT)
                atomic.write_json(tmp / checkpoint.STATE_JSON, self._state_json(step, position, last))

            path = checkpoint.write(self.ckpt_root, step, fill)
            checkpoint.prune(self.ckpt_root, self.cfg.checkpoint.keep)
            log.info("checkpoint %s written", path.name)
        self.dist.barrier()
        return path

    def resume(self) -> tuple[int, int, str | None]:
        """Load the newest good checkpoint; returns (step, data position, its name or None)."""
        path = checkpoint.newest_valid(self.ckpt_root) if self.dist.main else None
        path = self.dist.broadcast(str(path) if path else None)
        if path is None:
            return 0, 0, None
        path = Path(path)
        state = checkpoint.read_state(path)
        expect = {"training_digest": self.digest, "dataset_sha256": self.inputs["dataset"]["sha256"],
                  "base_model": self.base, "base_model_sha256": self.base_sha, "world_size": self.dist.world,
                  "total_steps": self.total}
        diff = [k for k, v in expect.items() if state.get(k) != v]
        if diff:
            raise ResumeError(f"{path} belongs to another run (differs in {', '.join(diff)}); restore the original "
                              f"settings or start over with --fresh")
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = load_file(str(path / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.peft, saved)
        now = get_peft_model_state_dict(self.peft)
        bad = [k for k in saved if k not in now or not torch.equal(now[k].cpu(), saved[k])]
        if bad or set(now) != set(saved):
            raise ResumeError(f"{path}: adapter tensors do not fit the model ({bad[:3] or sorted(set(now) ^ set(saved))[:3]})")
        gates, _ = load_gates(path / GATES_FILE)
        if sorted(gates) != sorted(self.gates):
            raise ResumeError(f"{path}: gates cover layers {sorted(gates)}, the model has {sorted(self.gates)}")
        with torch.no_grad():
            for i, g in self.gates.items():
                g.A.copy_(gates[i].to(g.A.device))
        self.optimizer.load_state_dict(checkpoint.load_pt(path, checkpoint.OPTIMIZER))
        extra = checkpoint.load_pt(path, checkpoint.STATE_PT)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        checkpoint.set_rng_state(extra["rng"][self.dist.rank])
        log.info("resuming from %s: step %d/%d, data position %d", path.name, state["step"], self.total,
                 state["data_position"])
        return state["step"], state["data_position"], path.name

    # --- the loop --------------------------------------------------------------------------------------------

    def step(self, step: int, position: int) -> dict[str, Any]:
        cfg, dev, world = self.cfg, self.dist.device, self.dist.world
        phase = self.pet.phase(step)
        lam = phase.weight if cfg.pet.enabled else 0.0
        reg = cfg.gates.orthogonal_reg if self.gates else 0.0
        window = [self.order.micro_batch(position + k) for k in range(self.accum * world)]
        targets = sum(self.data.examples[i].n_targets for mb in window for i in mb)
        mine = window[self.dist.rank::world]
        sums = torch.zeros(5, dtype=torch.float64)  # lm_sum, pet, ortho, correct, tokens
        pad = self.tokenizer.pad_token_id
        for k, idx in enumerate(mine):
            ids, mask, labels = (t.to(dev) for t in data.collate([self.data.examples[i] for i in idx], pad))
            sync = k == len(mine) - 1
            ctx = self.forward.no_sync() if self.dist.active and not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    lm_sum, pet, ortho, correct = self.forward(ids, mask, labels)
                loss = lm_sum * (world / targets) + (lam / self.accum) * pet + (reg / self.accum) * ortho
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            sums += torch.tensor([lm_sum.item(), pet.item(), ortho.item(), correct.item(), mask.sum().item()],
                                 dtype=torch.float64)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.sum_(sums)
        n = len(window)
        lm, pet_v, ortho_v = sums[0].item() / targets, sums[1].item() / n, sums[2].item() / n
        return {"total": lm + lam * pet_v + reg * ortho_v, "lm": lm, "pet": pet_v, "ortho": ortho_v,
                "lambda": lam, "phase": phase.name, "lr": lr, "grad_norm": grad_norm,
                "accuracy": sums[3].item() / targets, "tokens": int(sums[4].item())}

    def loop(self, step: int, position: int, resumed_from: str | None) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.main
        writer = None
        if main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1)
        session = {"status": "running", "step": step, "total_steps": self.total, "data_position": position,
                   "epoch": round(self.order.epoch_of(position), 4), "resumed_from": resumed_from,
                   "last_checkpoint": resumed_from, "pid": os.getpid(), "world_size": self.dist.world,
                   "training_digest": self.digest, "dataset": self.inputs["dataset"], "base_model": self.base,
                   "session_started_at": manifest.utc_stamp(self.started)}
        if main:
            checkpoint.write_session(self.out, session)
        bar = logs.progress(total=self.total, desc="train", unit="step")
        bar.update(step)
        last: dict[str, Any] = {}
        last_save = last_session = time.time()
        window_tokens, window_start = 0, time.time()
        save_steps, save_s = cfg.checkpoint.save_steps, (cfg.checkpoint.save_minutes or 0) * 60
        while step < self.total:
            t0 = time.time()
            v = self.step(step, position)
            step += 1
            position += self.accum * self.dist.world
            window_tokens += v["tokens"]
            v["tokens_per_s"] = v["tokens"] / max(time.time() - t0, 1e-9)
            v["step"] = step
            last = v
            if main:
                bar.update(1)
                bar.set_postfix_str(_fmt_losses(v), refresh=False)
                if writer:
                    for key in ("total", "lm", "pet", "ortho"):
                        writer.add_scalar(f"loss/{key}", v[key], step)
                    writer.add_scalar("pet/lambda", v["lambda"], step)
                    writer.add_scalar("pet/phase", self.pet.phase_index(step - 1), step)
                    writer.add_scalar("train/lr", v["lr"], step)
                    writer.add_scalar("train/grad_norm", v["grad_norm"], step)
                    writer.add_scalar("train/tokens_per_s", v["tokens_per_s"], step)
                    writer.add_scalar("train/token_accuracy", v["accuracy"], step)
                if step % cfg.logging.log_steps == 0 or step == self.total:
                    rate = window_tokens / max(time.time() - window_start, 1e-9)
                    window_tokens, window_start = 0, time.time()
                    log.info("step %d/%d %s acc %.3f (%.0f tok/s since last log)", step, self.total,
                             _fmt_losses(v), v["accuracy"], rate)
            due = (save_steps is not None and step % save_steps == 0) or step == self.total
            due = due or (save_s > 0 and time.time() - last_save >= save_s)
            if self.dist.broadcast(due):
                saved = self.save_checkpoint(step, position, dict(v))
                last_save = time.time()
                session["last_checkpoint"] = saved.name if saved else None
                checkpoint.fault(f"checkpoint-done:{step}")
            if main and (due or time.time() - last_session >= SESSION_EVERY_S):
                session.update(step=step, data_position=position, epoch=round(self.order.epoch_of(position), 4),
                               losses=dict(v))
                checkpoint.write_session(self.out, session)
                last_session = time.time()
        bar.close()
        if writer:
            writer.close()
        self.session = session
        return last


    # --- the final artifact ----------------------------------------------------------------------------------

    def write_final(self, last: dict[str, Any]) -> dict[str, Any]:
        clear_rotations(self.gates)
        in_sync = None
        if self.dist.active:
            prints = self.dist.gather(fingerprint(self.trainable))
            in_sync = len(set(prints)) == 1
            if not in_sync:
                raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        metrics = {
            "steps": self.total, "final_losses": {k: last.get(k) for k in ("total", "lm", "pet", "ortho")},
            "final_token_accuracy": last.get("accuracy"), "records": len(self.data.examples),
            "tokens_per_epoch": self.data.tokens, "epochs": round(self.order.epoch_of(self.total * self.accum
                                                                                      * self.dist.world), 4),
            "world_size": self.dist.world, "ddp_in_sync": in_sync,
        }
        if self.dist.main:
            with atomic.staging_dir(self.final_dir) as tmp:
                artifact.save_adapter(self.peft, tmp)
                artifact.save_gate_file(tmp, gate_tensors(self.gates), self.hidden)
                checkpoint.fault("final-write")
                m = manifest.build(artifact.STAGE, self.inputs, self.cfg.model_dump(mode="json"), self.digest,
                                   self.started, metrics, outputs={"adapter": "adapter_model.safetensors",
                                                                   "adapter_config": "adapter_config.json",
                                                                   "gates": GATES_FILE})
                m.update(artifact.describe(self.base, self.base_sha, self.cfg, sorted(self.gates), self.hidden))
                manifest.write(tmp, m)
            self.session.update(status="completed", step=self.total, final=str(self.final_dir))
            checkpoint.write_session(self.out, self.session)
            log.info("final artifact written to %s", self.final_dir)
        self.dist.barrier()
        return metrics


def configure_determinism(cfg: TrainConfig) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = False


def train(cfg: TrainConfig, dataset: str | Path, out_dir: str | Path, dist: Dist, fresh: bool = False) -> Result:
    """Train (or resume, or skip when the final artifact is up to date) and write `<out_dir>/final`."""
    out_dir, dataset = Path(out_dir), Path(dataset)
    run = Run(cfg, dataset, out_dir, dist)
    if not dataset.is_file():
        raise data.DataError(f"{dataset}: dataset file not found")
    run.hashes()
    if not fresh and artifact.up_to_date(run.final_dir, run.inputs, run.digest, run.base, run.base_sha):
        log.info("%s is up to date (same config, dataset and base model): skipped; --fresh retrains", run.final_dir)
        return Result(run.final_dir, True, 0, (manifest.read(run.final_dir) or {}).get("metrics", {}))
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.recover_dir(run.final_dir)
        if fresh:
            import shutil

            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
            (out_dir / checkpoint.SESSION).unlink(missing_ok=True)
            log.info("--fresh: previous checkpoints and logs removed")
    dist.barrier()
    configure_determinism(cfg)
    run.build()
    step, position, resumed = run.resume()
    last = run.loop(step, position, resumed)
    if not last:  # resumed from the last step's checkpoint: the update already happened
        state = checkpoint.read_state(run.ckpt_root / f"checkpoint-{run.total}")
        last = state.get("losses", {})
    metrics = run.write_final(last)
    return Result(run.final_dir, False, run.total, metrics)
