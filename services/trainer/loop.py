"""The training run: resume or start, loop over optimizer steps, checkpoint, write the final artifact.

Per optimizer step the global window is `grad_accum × world_size` micro-batches of the data stream; rank r
takes every world_size-th one. Losses are normalised over the window's records, so one process with
accumulation a·w and w DDP processes with accumulation a compute the same update, and so does the same run with
`train.packing` (the records of a rank's share packed into rows of at most seq_len tokens: fewer, fuller
forwards, the same sums):

    total = LM + λ(step)·PET + orthogonal_reg·ortho
    LM    = Σ token cross-entropy over assistant tokens in the window / their count
    PET   = mean over the window's records of each record's mean PET penalty (shared.pet.pet_sequence_sum)
    ortho = mean over gated layers of mean ‖RᵀR − I‖²

The gates' rotations are computed once per step and differentiated once per step (gates.StepRotations).

Exact resume: everything that decides the next update is in the checkpoint (adapter, gates, optimizer,
scheduler, grad scaler, every rank's RNG states, the step and the stream position), and nothing about the
trajectory depends on when checkpoints are taken.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.trainer import artifact, checkpoint, data
from services.trainer import device as device_setup
from services.trainer import model as mdl
from services.trainer.config import TrainConfig
from services.trainer.data import Dataset, Order
from services.trainer.distributed import Dist, fingerprint
from services.trainer.gates import StepRotations, attach_gates, clear_rotations, gate_tensors
from services.trainer.metrics import MetricsSink
from services.trainer.objective import Objective
from services.trainer.validation import Validation
from shared import logs, manifest, stage
from shared.config import ConfigError
from shared.pet import PetSchedule, Phase
from shared.so8 import SO8Gate

log = logs.get("trainer")
SESSION_EVERY_S = 5.0


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Precision:
    """The compute dtype of the forwards (training and validation alike) and the fp16 grad scaler."""

    device_type: str
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)


@dataclass(kw_only=True)
class State:
    """Everything one training session holds, built by Run's _setup_* steps."""

    tokenizer: Any
    data: Dataset
    order: Order
    total: int  # optimizer steps of the whole run
    pet: PetSchedule
    peft: torch.nn.Module  # the PEFT model (gates are submodules of it)
    gates: dict[int, SO8Gate]
    hidden: int
    trainable: list[torch.nn.Parameter]  # LoRA parameters, then gate parameters
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    objective: Objective
    forward: Any  # the objective, DDP-wrapped when distributed (no_sync)
    validation: Validation | None  # train.eval_steps on val.jsonl


@dataclass(frozen=True)
class Resumed:
    step: int
    position: int  # micro-batch index of the data stream
    name: str | None  # the checkpoint resumed from
    validation: tuple = ()  # the validation history up to that checkpoint


@dataclass(frozen=True)
class Model:
    peft: torch.nn.Module
    gates: dict[int, SO8Gate]
    hidden: int
    lora_params: list[torch.nn.Parameter]
    gate_params: list[torch.nn.Parameter]


class Run:
    """One training session (a fresh start or a resume) of one process: build -> resume -> loop -> final."""

    def __init__(self, cfg: TrainConfig, dataset: Path, out_dir: Path, dist: Dist, val_dataset: Path | None = None):
        self.cfg, self.dataset, self.out, self.dist = cfg, dataset, out_dir, dist
        self.val_dataset = val_dataset
        self.ckpt_root = out_dir / "checkpoints"
        self.final_dir = out_dir / "final"
        if not cfg.model.base_model:
            raise ConfigError("model.base_model: no base model (set it in the config or pass --base-model)")
        self.base: str = cfg.model.base_model
        self.digest = cfg.training_digest()
        self.started = time.time()
        self.base_sha: str | None = None
        if mdl.is_local(self.base):
            self.base_sha = dist.broadcast(manifest.sha256_tree(self.base) if dist.main else None)
        base_input = {"path": self.base, "kind": "dir" if self.base_sha else "hub", "sha256": self.base_sha}
        self.inputs = {"dataset": manifest.describe_input(dataset), "base_model": base_input}
        self.spec = stage.Spec(artifact.STAGE, self.final_dir, self.inputs, cfg.model_dump(mode="json"), self.digest)

    # --- setup, in order ---------------------------------------------------------------------------------------

    def build(self) -> State:
        seed_everything(self.cfg.train.seed)
        tokenizer = mdl.load_tokenizer(self.base)
        ds, order, total = self._setup_data(tokenizer)
        m = self._setup_model()
        optimizer, scheduler = self._setup_optimizer(m, total)
        precision = self._setup_precision()
        objective = Objective(m.peft, m.gates, self.cfg.pet.enabled, self.cfg.pet.huber_delta)
        return State(
            tokenizer=tokenizer,
            data=ds,
            order=order,
            total=total,
            pet=PetSchedule(total, [Phase(p.name, p.fraction, p.weight) for p in self.cfg.pet.phases]),
            peft=m.peft,
            gates=m.gates,
            hidden=m.hidden,
            trainable=m.lora_params + m.gate_params,
            optimizer=optimizer,
            scheduler=scheduler,
            precision=precision,
            objective=objective,
            forward=self._setup_forward(objective, m.gate_params),
            validation=self._setup_validation(tokenizer, precision),
        )

    def _setup_data(self, tokenizer) -> tuple[data.Dataset, data.Order, int]:
        t = self.cfg.train
        ds = data.load(self.dataset, tokenizer, t.seq_len, t.sample, t.seed)
        order = data.Order(len(ds.examples), t.batch_size, t.seed)
        total = data.total_steps(order.per_epoch, t.epochs, self.dist.world, t.grad_accum, t.max_steps)
        log.info(
            "data: %d records (%d tokens, %d truncated, %d skipped) from %s; %d steps of %d×%d×%d records%s",
            *(len(ds.examples), ds.tokens, ds.truncated, ds.dropped, self.dataset),
            *(total, t.batch_size, t.grad_accum, self.dist.world),
            f", packed into rows of at most {t.seq_len} tokens" if t.packing else "",
        )
        return ds, order, total

    def _setup_model(self) -> Model:
        cfg = self.cfg
        base_model: Any = mdl.load_base(cfg.model, self.base, self.dist.device)
        peft = mdl.add_lora(base_model, cfg.lora, self.base, cfg.train.seed)
        gates = {}
        if cfg.gates.enabled:
            gates = attach_gates(peft, None, cfg.gates.layer_indices, cfg.gates.init_scale, seed=cfg.train.seed)
        gate_params = [g.A for g in gates.values()]
        gate_ids = {id(p) for p in gate_params}
        lora_params = [p for p in peft.parameters() if p.requires_grad and id(p) not in gate_ids]
        log.info(
            "model: %s (%s, %s), LoRA r=%d α=%g on %s: %d params; gates on layers %s: %d params; device %s",
            *(self.base, cfg.model.quantization, cfg.model.precision, cfg.lora.r, cfg.lora.alpha),
            *(",".join(cfg.lora.target_modules), sum(p.numel() for p in lora_params)),
            *(sorted(gates) or "none", sum(p.numel() for p in gate_params), self.dist.device),
        )
        return Model(peft, gates, int(base_model.config.hidden_size), lora_params, gate_params)

    def _setup_optimizer(self, m: Model, total: int) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg.optim
        groups = [{"params": m.lora_params, "weight_decay": cfg.weight_decay}]
        if m.gate_params:
            groups.append({"params": m.gate_params, "weight_decay": 0.0})  # decay would pull rotations to identity
        optimizer = mdl.build_optimizer(cfg, groups, self.dist.device)
        return optimizer, mdl.build_scheduler(cfg, optimizer, total)

    def _setup_precision(self) -> Precision:
        dev = self.dist.device
        dtype = mdl.compute_dtype(self.cfg.model, dev)
        scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and dtype == torch.float16 else None
        return Precision(dev.type, dtype, scaler)

    def _setup_forward(self, objective: Objective, gate_params: list[torch.nn.Parameter]) -> Any:
        if not self.dist.active:
            return objective
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the gates get their gradient once per step, after the forwards (StepRotations.backward averages it over
        # the ranks): DDP's reducer must not wait for it
        gate_ids = {id(p) for p in gate_params}
        ignored = [n for n, p in objective.named_parameters() if id(p) in gate_ids]
        DDP._set_params_and_buffers_to_ignore_for_model(objective, ignored)
        dev = self.dist.device
        return DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True)

    def _setup_validation(self, tokenizer, precision: Precision) -> Validation | None:
        t = self.cfg.train
        if not t.eval_steps or self.val_dataset is None:
            return None
        val = data.load(self.val_dataset, tokenizer, t.seq_len, t.eval_max_records, t.seed)
        log.info(
            "validation: %d records (%d target tokens) of %s every %d steps",
            *(len(val.examples), sum(e.n_targets for e in val.examples), self.val_dataset, t.eval_steps),
        )
        return Validation(
            val,
            t.eval_steps,
            tokenizer.pad_token_id,
            self.dist.device,
            precision.autocast,
            tokenizer=tokenizer,
            generate_records=t.eval_generate_records,
            generate_tokens=t.eval_generate_tokens,
        )

    # --- checkpoints (checkpoint.save / checkpoint.restore) -------------------------------------------------------

    def identity(self, s: State) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        return {
            "training_digest": self.digest,
            "dataset_sha256": self.inputs["dataset"]["sha256"],
            "base_model": self.base,
            "base_model_sha256": self.base_sha,
            "world_size": self.dist.world,
            "total_steps": s.total,
        }

    def save_checkpoint(self, s: State, step: int, position: int, last: dict[str, Any]) -> Path | None:
        rngs = self.dist.gather(checkpoint.rng_state())
        path = None
        if self.dist.main:
            trainer_state = {
                "step": step,
                "data_position": position,
                "epoch": round(s.order.epoch_of(position), 4),
                **self.identity(s),
                "losses": last,
                "validation": s.validation.history if s.validation else [],
            }
            path = checkpoint.save(self.ckpt_root, s, trainer_state, rngs, self.cfg.checkpoint.keep)
        self.dist.barrier()
        return path

    def resume(self, s: State) -> Resumed:
        """Load the newest good checkpoint into `s`."""
        path = checkpoint.newest_valid(self.ckpt_root) if self.dist.main else None
        path = self.dist.broadcast(str(path) if path else None)
        if path is None:
            return Resumed(0, 0, None)
        state = checkpoint.restore(Path(path), s, self.identity(s), self.dist.rank)
        log.info(
            "resuming from %s: step %d/%d, data position %d",
            *(Path(path).name, state["step"], s.total),
            state["data_position"],
        )
        return Resumed(state["step"], state["data_position"], Path(path).name, tuple(state.get("validation") or ()))

    # --- the loop --------------------------------------------------------------------------------------------

    def step(self, s: State, step: int, position: int) -> dict[str, Any]:
        """One optimizer step over the global window of micro-batches starting at stream `position`."""
        cfg, world = self.cfg, self.dist.world
        phase = s.pet.phase(step)
        lam = phase.weight if cfg.pet.enabled else 0.0
        reg = cfg.gates.orthogonal_reg if s.gates else 0.0
        window = [
            [s.data.examples[i] for i in s.order.micro_batch(position + k)] for k in range(cfg.train.grad_accum * world)
        ]
        targets = sum(e.n_targets for mb in window for e in mb)
        sequences = max(1, sum(e.has_pet for mb in window for e in mb))
        mine = window[self.dist.rank :: world]
        batches = data.micro_batches(mine, cfg.train.packing, cfg.train.seq_len, s.tokenizer.pad_token_id)
        rotations = s.objective.step = StepRotations(s.gates) if s.gates else None
        sums = self._accumulate(s, batches, world / targets, lam * world / sequences)
        ortho_v = 0.0
        if rotations is not None:
            ortho_v = rotations.orthogonality()
            average = (lambda g: self.dist.sum_(g).div_(world)) if self.dist.active else None
            rotations.backward(reg, average, s.precision.scaler.scale if s.precision.scaler else None)
            s.objective.step = None
        grad_norm, lr = self._update(s)
        self.dist.sum_(sums)
        lm, pet_v = sums[0].item() / targets, sums[1].item() / sequences
        return {
            "total": lm + lam * pet_v + reg * ortho_v,
            "lm": lm,
            "pet": pet_v,
            "ortho": ortho_v,
            "lambda": lam,
            "phase": phase.name,
            "lr": lr,
            "grad_norm": grad_norm,
            "accuracy": sums[2].item() / targets,
            "tokens": int(sums[3].item()),
            "records": sum(len(mb) for mb in window),
            "forwards": len(batches),
        }

    def _accumulate(self, s: State, batches: list, lm_scale: float, pet_scale: float) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches (DDP syncs on the last); [lm_sum, pet_sum, correct,
        real tokens] summed over them."""
        scaler, dev = s.precision.scaler, self.dist.device
        sums = torch.zeros(4, dtype=torch.float64)
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            ctx = s.forward.no_sync() if self.dist.active and not sync else contextlib.nullcontext()
            with ctx:
                with s.precision.autocast():
                    lm_sum, pet, _, correct = s.forward(**batch.to(dev).inputs())
                loss = lm_sum * lm_scale + pet_scale * pet
                (scaler.scale(loss) if scaler else loss).backward()
            sums += torch.tensor([lm_sum.item(), pet.item(), correct.item(), batch.real_tokens], dtype=torch.float64)
        return sums

    def _update(self, s: State) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule; returns (grad norm, the lr used)."""
        scaler = s.precision.scaler
        if scaler:
            scaler.unscale_(s.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(s.trainable, self.cfg.optim.max_grad_norm or float("inf")).item()
        lr = s.optimizer.param_groups[0]["lr"]
        if scaler:
            scaler.step(s.optimizer)
            scaler.update()
        else:
            s.optimizer.step()
        # A changed, and bitsandbytes' optimizers write it through a raw pointer that leaves A._version alone: no
        # rotation computed before this update may be applied after it
        clear_rotations(s.gates)
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def loop(self, s: State, start: Resumed) -> dict[str, Any]:
        """Optimizer steps from `start` to the end; returns the last step's figures ({} if none was left)."""
        cfg, main = self.cfg, self.dist.main
        session = Session(
            self.out,
            main,
            {
                "status": "running",
                "total_steps": s.total,
                "resumed_from": start.name,
                "last_checkpoint": start.name,
                "pid": os.getpid(),
                "world_size": self.dist.world,
                "training_digest": self.digest,
                "dataset": self.inputs["dataset"],
                "base_model": self.base,
                "session_started_at": manifest.utc_stamp(self.started),
            },
        )
        session.update(
            True, step=start.step, data_position=start.position, epoch=round(s.order.epoch_of(start.position), 4)
        )
        sink = MetricsSink(cfg.logging, self.out, s.pet, start.step, s.total, main)
        policy = checkpoint.SavePolicy(cfg.checkpoint.save_steps, (cfg.checkpoint.save_minutes or 0) * 60, s.total)
        step, position, last = start.step, start.position, {}
        if s.validation is not None:
            s.validation.history = [dict(h) for h in start.validation]
        while step < s.total:
            t0 = time.time()
            v = self.step(s, step, position)
            step += 1
            position += cfg.train.grad_accum * self.dist.world
            v.update(tokens_per_s=v["tokens"] / max(time.time() - t0, 1e-9), step=step)
            last = v
            if s.validation is not None and s.validation.due(step, s.total):
                point = s.validation.run(s.objective, step)
                v["val_lm"] = point["lm"]
                v |= {f"val_{k}": point[k] for k in ("format", "label_accuracy") if k in point}
            sink.step(step, v)
            due = self.dist.broadcast(policy.due(step))
            if due:
                saved = self.save_checkpoint(s, step, position, dict(v))
                policy.saved()
                session.state["last_checkpoint"] = saved.name if saved else None
                checkpoint.fault(f"checkpoint-done:{step}")
            session.update(
                due, step=step, data_position=position, epoch=round(s.order.epoch_of(position), 4), losses=dict(v)
            )
        sink.close()
        self.session = session
        return last

    # --- the final artifact ----------------------------------------------------------------------------------

    def write_final(self, s: State, last: dict[str, Any]) -> dict[str, Any]:
        clear_rotations(s.gates)
        in_sync = None
        if self.dist.active:
            prints = self.dist.gather(fingerprint(s.trainable))
            in_sync = len(set(prints)) == 1
            if not in_sync:
                raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        metrics = {
            "steps": s.total,
            "final_losses": {k: last.get(k) for k in ("total", "lm", "pet", "ortho")},
            "final_token_accuracy": last.get("accuracy"),
            "records": len(s.data.examples),
            "tokens_per_epoch": s.data.tokens,
            "epochs": round(s.order.epoch_of(s.total * self.cfg.train.grad_accum * self.dist.world), 4),
            "world_size": self.dist.world,
            "ddp_in_sync": in_sync,
            "validation": s.validation.summary() if s.validation else None,
        }
        if self.dist.main:

            def fill(tmp: Path) -> stage.Built:
                artifact.save_adapter(s.peft, tmp)
                artifact.save_gate_file(tmp, gate_tensors(s.gates), s.hidden)
                checkpoint.fault("final-write")
                return stage.Built(
                    metrics,
                    dict(artifact.OUTPUTS),
                    artifact.describe(self.base, self.base_sha, self.cfg, sorted(s.gates), s.hidden),
                )

            stage.publish(self.spec, fill, self.started)
            self.session.update(True, status="completed", step=s.total, final=str(self.final_dir))
            log.info("final artifact written to %s", self.final_dir)
        self.dist.barrier()
        return metrics


class Session:
    """`training_session.json` (atomic): where the run is, for people and the pipeline's progress; written at most
    every SESSION_EVERY_S seconds unless forced (a checkpoint, the end)."""

    def __init__(self, out_dir: Path, main: bool, state: dict[str, Any]):
        self.out, self.main, self.state, self.written = out_dir, main, state, 0.0

    def update(self, force: bool, **changes: Any) -> None:
        self.state.update(changes)
        if self.main and (force or time.time() - self.written >= SESSION_EVERY_S):
            checkpoint.write_session(self.out, self.state)
            self.written = time.time()


def configure_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device_setup.configure(device, cfg.train.deterministic)


def train(
    cfg: TrainConfig,
    dataset: str | Path,
    out_dir: str | Path,
    dist: Dist,
    fresh: bool = False,
    val_dataset: str | Path | None = None,
    allow_cpu: bool = False,
) -> stage.StageResult:
    """Train (or resume, or skip when the final artifact is up to date) and write `<out_dir>/final`.

    Validation (train.eval_steps) reads `val_dataset`, by default the val.jsonl beside `dataset` when there is one.
    A CUDA profile (8/4-bit, bf16/fp16) on a process without CUDA is refused unless `allow_cpu`.
    """
    if dist.main:
        log.info("%s", device_setup.describe(dist.device))
    device_setup.require_usable(cfg, dist.device, allow_cpu)
    out_dir, dataset = Path(out_dir), Path(dataset)
    if not dataset.is_file():
        raise data.DataError(f"{dataset}: dataset file not found")
    val = Path(val_dataset) if val_dataset else dataset.with_name("val.jsonl")
    if val_dataset and not val.is_file():
        raise data.DataError(f"{val}: validation file not found")
    if cfg.train.eval_steps and not val.is_file():
        log.warning("train.eval_steps is set but there is no %s: training without validation", val)
    run = Run(cfg, dataset, out_dir, dist, val if val.is_file() else None)
    if not fresh and (done := run.spec.current()) is not None:
        log.info("%s is up to date (same config, dataset and base model): skipped; --fresh retrains", run.final_dir)
        return done
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            import shutil

            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
            (out_dir / checkpoint.SESSION).unlink(missing_ok=True)
            log.info("--fresh: previous checkpoints and logs removed")
    dist.barrier()
    configure_determinism(cfg, dist.device)
    s = run.build()
    start = run.resume(s)
    last = run.loop(s, start)
    if not last:  # resumed from the last step's checkpoint: the update already happened
        last = checkpoint.read_state(run.ckpt_root / f"checkpoint-{s.total}").get("losses", {})
    metrics = run.write_final(s, last)
    return stage.StageResult(artifact.STAGE, run.final_dir, False, {"metrics": metrics})
