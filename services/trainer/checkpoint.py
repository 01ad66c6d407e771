"""Power-loss-safe checkpoints (docs/design.md "Power-loss recovery").

A checkpoint is a directory ``checkpoints/checkpoint-<step>/`` holding:

    adapter_config.json, adapter_model.safetensors   the PEFT LoRA adapter
    so8t_gates.safetensors                           the gates (shared.so8.save_gates)
    optimizer.pt                                     optimizer state
    training_state.pt                                scheduler, grad scaler, RNG states of every rank
    trainer_state.json                               step, data position, hashes that must match to resume
    checkpoint.json                                  the completion marker, written last: size + SHA-256 per file

It is built in a hidden temp directory beside its final name, fsynced, and renamed into place (shared.atomic),
so a directory named ``checkpoint-<step>`` is complete unless the disk itself lost data; `verify` catches that
(a truncated or corrupted file no longer matches its recorded size and hash). On start the trainer removes
leftovers, sets aside checkpoints that fail verification (renamed ``checkpoint-<step>.corrupt``, with a log
line) and resumes from the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.trainer import artifact
from shared import atomic, logs
from shared.errors import InputError, write_failure
from shared.layout import TRAINING_SESSION
from shared.manifest import sha256_file, utc_stamp

log = logs.get("trainer")

FORMAT = "so8t-checkpoint/1"
MARKER = "checkpoint.json"
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"
OPTIMIZER = "optimizer.pt"
SESSION = TRAINING_SESSION
_NAME = re.compile(r"^checkpoint-(\d+)$")

if TYPE_CHECKING:
    from services.trainer.loop import State


class ResumeError(InputError, RuntimeError):
    """The newest good checkpoint cannot continue this run (other config, dataset or base model)."""


@dataclass
class SavePolicy:
    """When to checkpoint: every `steps` optimizer steps, after `seconds` since the last save, and at the end.

    Nothing about the trajectory depends on when checkpoints are taken, so saving is a pure side effect."""

    steps: int | None
    seconds: float
    total: int
    last: float = field(default_factory=time.time)

    def due(self, step: int) -> bool:
        return (
            (self.steps is not None and step % self.steps == 0)
            or step == self.total
            or (self.seconds > 0 and time.time() - self.last >= self.seconds)
        )

    def saved(self) -> None:
        self.last = time.time()


def fault(point: str) -> None:
    """Test hook: SIGKILL this process at `point` when $SO8T_FAULT names it: ``checkpoint-write:<step>`` (files
    written, marker not yet), ``checkpoint-done:<step>`` (checkpoint in place), ``final-write``."""
    if os.environ.get("SO8T_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every directory named checkpoint-<step>, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def write(root: Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Build checkpoint-<step> with `fill(tmp_dir)`, add the marker, and rename it into place."""
    target = root / f"checkpoint-{step}"
    with atomic.staging_dir(target) as tmp:
        try:
            fill(tmp)
            fault(f"checkpoint-write:{step}")
            files = {}
            for p in sorted(tmp.iterdir()):
                if p.is_file():
                    files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            atomic.write_json(tmp / MARKER, {"format": FORMAT, "step": step, "files": files, "written_at": utc_stamp()})
        except Exception as err:  # a full disk: a clear error naming the path (the older checkpoints stay)
            disk = write_failure(err, tmp)
            if disk is None:
                raise
            raise disk from err
    return target


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no completion marker ({MARKER})"
    except (OSError, ValueError) as err:
        return f"unreadable completion marker ({err})"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        return "completion marker is not an so8t checkpoint marker"
    for required in (STATE_JSON, STATE_PT, OPTIMIZER):
        if required not in marker["files"]:
            return f"marker lists no {required}"
    for name, meta in marker["files"].items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != meta.get("bytes"):
            return f"{name} is {size} bytes, the marker says {meta.get('bytes')} (truncated or corrupted)"
        if sha256_file(p) != meta.get("sha256"):
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


def set_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    atomic.fsync_path(path.parent)
    return aside


def newest_valid(root: Path) -> Path | None:
    """Remove leftovers of interrupted writes, set aside bad checkpoints, return the newest good one."""
    for p in atomic.remove_stale_temps(root):
        log.info("removed incomplete checkpoint leftover %s", p.name)
    for _, path in checkpoint_dirs(root):
        why = verify(path)
        if why is None:
            return path
        aside = set_aside(path)
        log.warning("checkpoint %s failed verification: %s; moved to %s, trying an older one", path, why, aside.name)
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (renamed to a temp name first, so a crash mid-delete leaves
    a leftover that the next start removes, never a half checkpoint under a checkpoint name)."""
    for _, path in checkpoint_dirs(root)[keep:]:
        doomed = path.with_name(f".{path.name}.del.tmp")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_JSON).read_text(encoding="utf-8"))


def load_pt(path: Path, name: str) -> Any:
    return torch.load(path / name, map_location="cpu", weights_only=True)


# --- what a checkpoint holds: save and restore ----------------------------------------------------------------


def save(root: Path, s: State, trainer_state: dict[str, Any], rngs: list[dict[str, Any]], keep: int) -> Path:
    """Write checkpoint-<step> of training state `s` (main process; `rngs`: every rank's RNG states), keep the
    newest `keep`."""
    from services.trainer.gates import gate_tensors

    def fill(tmp: Path) -> None:
        artifact.save_adapter(s.peft, tmp)
        artifact.save_gate_file(tmp, gate_tensors(s.gates), s.hidden)
        torch.save(s.optimizer.state_dict(), tmp / OPTIMIZER)
        scaler = s.precision.scaler
        extra = {"scheduler": s.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "rng": rngs}
        torch.save(extra, tmp / STATE_PT)
        atomic.write_json(tmp / STATE_JSON, trainer_state)

    path = write(root, trainer_state["step"], fill)
    prune(root, keep)
    log.info("checkpoint %s written", path.name)
    return path


def restore(path: Path, s: State, identity: dict[str, Any], rank: int) -> dict[str, Any]:
    """Load checkpoint `path` into `s` (adapter, gates, optimizer, scheduler, scaler, this rank's RNG states);
    returns its trainer_state.json. Refuses one whose `identity` keys differ from this run's."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from shared.so8 import load_gates

    state = read_state(path)
    diff = [k for k, v in identity.items() if state.get(k) != v]
    if diff:
        raise ResumeError(
            f"{path} belongs to another run (differs in {', '.join(diff)}); restore the original "
            f"settings or start over with --fresh"
        )
    saved = load_file(str(path / artifact.ADAPTER_WEIGHTS))
    set_peft_model_state_dict(s.peft, saved)
    now = get_peft_model_state_dict(s.peft)
    bad = [k for k in saved if k not in now or not torch.equal(now[k].cpu(), saved[k])]
    if bad or set(now) != set(saved):
        raise ResumeError(
            f"{path}: adapter tensors do not fit the model ({bad[:3] or sorted(set(now) ^ set(saved))[:3]})"
        )
    gates, _ = load_gates(path / artifact.GATES)
    if sorted(gates) != sorted(s.gates):
        raise ResumeError(f"{path}: gates cover layers {sorted(gates)}, the model has {sorted(s.gates)}")
    with torch.no_grad():
        for i, g in s.gates.items():
            g.A.copy_(gates[i].to(g.A.device))
    s.optimizer.load_state_dict(load_pt(path, OPTIMIZER))
    extra = load_pt(path, STATE_PT)
    s.scheduler.load_state_dict(extra["scheduler"])
    if s.precision.scaler is not None and extra.get("scaler"):
        s.precision.scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"][rank])
    return state


# --- RNG states -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own device only (each rank saves its own): all visible devices' states would tie the
        # checkpoint to this machine's GPU count
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before the own-device format: every device's states
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# --- training_session.json ----------------------------------------------------------------------------------


def write_session(out_dir: Path, session: dict[str, Any]) -> None:
    session = dict(session, updated_at=utc_stamp())
    atomic.write_json(out_dir / SESSION, session)
