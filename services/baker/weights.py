"""Bake the weights tensor by tensor, in bounded memory.

Each output tensor depends on one base tensor only (plus its LoRA pair and, for a gated o_proj, its layer's
rotation), so the writer never holds more than one tensor's float32 copy: read it from the base's safetensors
shard, upcast to float32, merge LoRA, fold the rotation, check it is finite, cast to the output dtype and stream
its bytes into the output shard. Output shards are planned up front from the base's safetensors headers (names,
shapes, dtypes are all known), so each shard's header is written first and its tensors follow one at a time;
no shard, and never a second model, is assembled in memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.baker.inputs import BakeInputs, LoraDelta, o_proj_key
from shared import logs
from shared.errors import StageError
from shared.so8 import fold_into_weight, rotations

log = logs.get("bake")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float64: "F64",
}
_FROM_ST = {v: k for k, v in _ST_DTYPE.items()}
_FLOAT_ST = ("F64", "F32", "F16", "BF16")

Fold = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteError(StageError, ValueError):
    """A NaN or Inf in a baked tensor (or in the base tensor it came from)."""


@dataclass(frozen=True)
class TensorPlan:
    name: str
    source: Path
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _order(name: str) -> tuple:
    """Embeddings, then layers 0, 1, ... (numerically), then the final norm and lm_head."""
    group = 0 if "embed" in name else 1 if ".layers." in name else 2
    return (group, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)))


def plan_shards(inputs: BakeInputs, dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Every base tensor, in natural order (embeddings, layer 0, 1, ..., norm, lm_head), cut into shards."""
    plans = []
    for name in sorted(inputs.base.shapes, key=_order):
        shape, st = inputs.base.shapes[name]
        plans.append(TensorPlan(name, inputs.base.weights[name], shape, dtype if st in _FLOAT_ST else _FROM_ST[st]))
    return cut_into_shards(plans, max_shard_bytes)


def cut_into_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive tensors, a new shard whenever the next would pass the limit (a bigger tensor gets its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def bake_tensor(
    W: torch.Tensor, lora: LoraDelta | None, R: torch.Tensor | None, fold: Fold = fold_into_weight
) -> torch.Tensor:
    """W' = (W + scaling · B @ A) @ blockdiag(R), all in float32 (docs/design.md: merge first, then fold)."""
    W = W.float()
    if lora is not None:
        W = W + lora.scaling * (lora.B @ lora.A)
    if R is not None:
        W = fold(W, R)
    return W


class SafetensorsStream:
    """Write one safetensors file whose header is known in advance, one tensor at a time (in plan order)."""

    def __init__(self, path: Path, plans: list[TensorPlan], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for p in plans:
            header[p.name] = {
                "dtype": _ST_DTYPE[p.dtype],
                "shape": list(p.shape),
                "data_offsets": [offset, offset + p.nbytes],
            }
            offset += p.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # tensor data starts 8-byte aligned
        self.path, self._plans, self._next = path, plans, 0
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        p = self._plans[self._next]
        if name != p.name or tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise RuntimeError(
                f"{self.path}: expected {p.name} {p.shape} {p.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))  # type: ignore[arg-type]  # numpy arrays are buffers
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plans):
            raise RuntimeError(f"{self.path}: {len(self._plans) - self._next} tensors never written")
        self._fh.flush()
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a base shard; the file is opened per tensor so no mapping outlives its use."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _baked(p: TensorPlan, inputs: BakeInputs, rotated: dict[str, int], fold: Fold) -> tuple[torch.Tensor, bool, bool]:
    """The output tensor of `p` (LoRA merged, rotation folded where they apply, cast, checked finite), and whether a
    LoRA pair was merged and a rotation folded into it."""
    src = read_tensor(p.source, p.name)
    if not src.is_floating_point():
        return src, False, False
    if not bool(src.isfinite().all()):
        raise NonFiniteError(f"{p.source}: base tensor {p.name} contains NaN or Inf")
    lora = inputs.lora.get(p.name)
    R = rotations(inputs.gates[rotated[p.name]]) if p.name in rotated else None
    out = bake_tensor(src, lora, R, fold) if (lora is not None or R is not None) else src
    del src
    out = out.to(p.dtype)
    if not bool(out.isfinite().all()):
        raise NonFiniteError(
            f"baked tensor {p.name} has NaN or Inf in {p.dtype} (overflow?); "
            f"base {p.source}, adapter/gates in {inputs.trained}"
        )
    return out, lora is not None, R is not None


def write_weights(
    inputs: BakeInputs,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    fold: Fold = fold_into_weight,
) -> dict:
    """Stream every baked tensor into `out_dir`; returns what the manifest reports about the weights."""
    shards = plan_shards(inputs, dtype, max_shard_bytes)
    files = shard_names(len(shards))
    rotated = {o_proj_key(i): i for i in inputs.gates}
    total = sum(len(s) for s in shards)
    bar = logs.progress(total=total, desc="bake", unit="tensor")
    weight_map: dict[str, str] = {}
    merged, folded, total_bytes = 0, 0, 0
    for plans, fname in zip(shards, files):
        stream = SafetensorsStream(out_dir / fname, plans)
        try:
            for p in plans:
                out, lora, R = _baked(p, inputs, rotated, fold)
                merged += lora
                folded += R
                stream.write(p.name, out)
                del out
                weight_map[p.name] = fname
                total_bytes += p.nbytes
                bar.update(1)
        except BaseException:
            stream.abort()
            raise
        stream.close()
    bar.close()
    if merged != len(inputs.lora) or folded != len(inputs.gates):  # every pair and gate must have found its tensor
        raise RuntimeError(f"merged {merged}/{len(inputs.lora)} LoRA pairs, folded {folded}/{len(inputs.gates)} gates")
    if len(files) > 1:
        from shared import atomic

        atomic.write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
        )
    log.info(
        "wrote %d tensors (%.1f MiB, %s) in %d shard(s); merged %d LoRA pairs, folded %d rotations",
        total,
        total_bytes / 2**20,
        str(dtype).replace("torch.", ""),
        len(files),
        merged,
        folded,
    )
    return {"files": files, "tensors": total, "bytes": total_bytes, "lora_merged": merged, "rotations_folded": folded}


def tensor_names(out_dir: Path) -> Iterable[str]:
    from safetensors import safe_open

    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            yield from st.keys()
