"""Which device the trainer runs on, said plainly at start, and refused when it cannot run the profile.

A profile that asks for an 8/4-bit base or half precision is a CUDA profile: on the CPU it would train the
3.8 B model in fp32 through bitsandbytes' CPU kernels (days per epoch). Without a usable CUDA device (a CPU build
of torch, a driver too old for the image's CUDA, CUDA_VISIBLE_DEVICES empty) `so8t train` exits 2 with the reason,
unless told `--allow-cpu` (tests, the full-size rehearsal).
"""

from __future__ import annotations

import os

import torch

from services.trainer.config import TrainConfig
from shared import logs
from shared.errors import InputError

log = logs.get("trainer")


class DeviceError(InputError, RuntimeError):
    """The profile needs CUDA and none is usable."""


def cuda_needs(cfg: TrainConfig) -> list[str]:
    """What in the profile only makes sense on CUDA (empty: it runs as meant on the CPU)."""
    needs = []
    if cfg.model.quantization != "none":
        needs.append(f"model.quantization: {cfg.model.quantization}")
    if cfg.model.precision != "fp32":
        needs.append(f"model.precision: {cfg.model.precision}")
    return needs


def why_no_cuda() -> str:
    """A one-line reason torch sees no CUDA device."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install the CUDA wheel, or use the so8t-cuda image)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is set and empty"
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable device "
        "(no GPU passed to the container, or an NVIDIA driver too old for this CUDA: see nvidia-smi)"
    )


def require_usable(cfg: TrainConfig, device: torch.device, allow_cpu: bool) -> None:
    """Refuse (exit 2) a CUDA profile on the CPU unless `allow_cpu`; say what happens when allowed."""
    needs = cuda_needs(cfg) if device.type == "cpu" else []
    if not needs:
        return
    if not allow_cpu:
        raise DeviceError(
            f"this profile needs a CUDA device ({'; '.join(needs)}) and none is usable: {why_no_cuda()}. "
            "Fix the GPU setup, use a CPU profile (configs/train/tiny.yaml), or pass --allow-cpu to train it on the "
            "CPU anyway (fp32 compute: slow)"
        )
    log.warning("--allow-cpu: %s on the CPU, in fp32 (%s)", ", ".join(needs), why_no_cuda())


def describe(device: torch.device) -> str:
    """torch and CUDA versions, the device's name and free memory, for the first log lines of a run."""
    text = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"
    if device.type != "cuda":
        return f"{text}; device cpu ({torch.get_num_threads()} threads)"
    free, total = torch.cuda.mem_get_info(device)
    props = torch.cuda.get_device_properties(device)
    return (
        f"{text}; device {device} {props.name} (compute {props.major}.{props.minor}), "
        f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, {torch.cuda.device_count()} visible"
    )


def configure(device: torch.device, deterministic: bool) -> None:
    """TF32 for the fp32 matmuls CUDA training still does (the int8 layers' backward, which peft's upcast inputs
    reach in fp32), unless the run must be bitwise reproducible."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
