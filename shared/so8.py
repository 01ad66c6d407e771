"""The SO(8) rotation gate (docs/design.md "SO(8) rotation gate", fixed conventions). One implementation: the
trainer uses `SO8Gate` on the input of `self_attn.o_proj`, the baker folds the same rotation (`fold_into_weight`).

- Per gated layer a parameter A of shape [k, 8, 8] (float32), hidden size D = 8k.
- Generator G = A - Aᵀ, rotation R_n = matrix_exp(G_n) (float32, evaluated in float64): orthogonal, det +1.
- Column convention: block n of the input becomes R_n · x_n, so o_proj(gate(x)) = W · blockdiag(R) · x and the
  exact bake is W' = W @ blockdiag(R).
- Saved as safetensors with keys ``layers.<i>.A`` plus metadata (layer indices, conventions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

BLOCK = 8
CONVENTION = "x_n -> R_n x_n on o_proj input; R = matrix_exp(A - A^T); bake W' = W @ blockdiag(R)"


def rotations(A: torch.Tensor) -> torch.Tensor:
    """[k, 8, 8] parameters -> [k, 8, 8] float32 rotations.

    The exponential is evaluated in float64 and rounded once to float32: a float32 matrix_exp drifts ~1e-6
    from orthogonal (det off by ~1e-6 already at init_scale 0.05), the rounded float64 one stays ~1e-7 at
    any angle. 8x8 blocks make this cheap next to the layer's matmuls.
    """
    G = A.double() - A.double().transpose(-1, -2)
    return torch.linalg.matrix_exp(G).float()


def block_diag(R: torch.Tensor) -> torch.Tensor:
    """[k, 8, 8] -> the [8k, 8k] block-diagonal matrix."""
    return torch.block_diag(*R.unbind(0))


def pair_blocks(R: torch.Tensor) -> torch.Tensor:
    """[k, 8, 8] (k even) -> [k/2, 16, 16]: blocks 2m and 2m+1 on the diagonal of pair m, zeros beside them."""
    pairs = R.reshape(-1, 2, BLOCK, BLOCK)
    zero = torch.zeros_like(pairs[:, 0])
    top = torch.cat([pairs[:, 0], zero], dim=-1)
    bottom = torch.cat([zero, pairs[:, 1]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def apply_rotation(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x[..., 8k] -> each 8-block x_n replaced by R_n @ x_n.

    Computed on pairs of blocks (`pair_blocks`: one batched [16, 16] product per pair, the zero halves adding
    exact zeros): the same rotation, but the batched matmul behind the einsum is 2-3x faster with 16-wide
    matrices than with 8-wide ones, forward and backward (bench/trainer_vs_hf.py measures the gate's share of a
    training step). An odd block count takes the plain per-block product.
    """
    k = R.shape[0]
    R = R.to(x.dtype)
    if k % 2:
        xb = x.reshape(*x.shape[:-1], k, BLOCK)
        return torch.einsum("kij,...kj->...ki", R, xb).reshape(x.shape)
    xp = x.reshape(*x.shape[:-1], k // 2, 2 * BLOCK)
    return torch.einsum("pij,...pj->...pi", pair_blocks(R), xp).reshape(x.shape)


def fold_into_weight(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W' = W @ blockdiag(R), computed block by block in float32 (no [D, D] matrix is built)."""
    out_features, d = W.shape
    k = R.shape[0]
    if d != k * BLOCK:
        raise ValueError(f"weight has {d} input features, rotation covers {k * BLOCK}")
    Wb = W.float().reshape(out_features, k, BLOCK)
    return torch.einsum("oki,kij->okj", Wb, R.float()).reshape(out_features, d)


def orthogonality_error(R: torch.Tensor) -> torch.Tensor:
    """mean ‖RᵀR − I‖² over the blocks (the prototype's regulariser)."""
    eye = torch.eye(BLOCK, device=R.device, dtype=R.dtype)
    return ((R.transpose(-1, -2) @ R - eye) ** 2).sum(dim=(-1, -2)).mean()


class SO8Gate(nn.Module):
    """Trainable block rotation of a hidden vector; `init_scale` 0 is the exact identity.

    As a module it rotates what it is given (`gate(x)`); hooked onto a layer (`hook_input_of`) it rotates that
    layer's input. A rotation computed elsewhere for many gates at once can be handed in (`use_rotation`): the
    gate applies it for as long as A is unchanged (its version counter), then computes its own again.
    """

    def __init__(self, hidden_size: int, init_scale: float = 0.05, generator: torch.Generator | None = None):
        super().__init__()
        if hidden_size % BLOCK:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {BLOCK}")
        A = torch.randn(hidden_size // BLOCK, BLOCK, BLOCK, generator=generator) * init_scale
        self.A = nn.Parameter(A.float())
        self._given: tuple[torch.Tensor, int] | None = None  # (R, the A version it was computed from)
        self._hook: RemovableHandle | None = None

    def rotation(self) -> torch.Tensor:
        """R of the current A, freshly computed."""
        return rotations(self.A)

    def use_rotation(self, R: torch.Tensor | None) -> None:
        """Apply `R` (computed from the current A) until A changes; None forgets it."""
        self._given = None if R is None else (R, self.A._version)

    def current_rotation(self) -> torch.Tensor:
        if self._given is not None and self._given[1] == self.A._version:
            return self._given[0]
        return self.rotation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_rotation(x, self.current_rotation())

    def hook_input_of(self, layer: nn.Module) -> None:
        """Rotate the first input of every `layer(...)` call from now on."""
        if self._hook is not None:
            raise ValueError("this gate is already hooked onto a layer")
        self._hook = layer.register_forward_pre_hook(lambda _m, args: (self(args[0]), *args[1:]))

    def unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def extra_repr(self) -> str:
        return f"blocks={self.A.shape[0]}, block=8"


def rotation_stats(A: torch.Tensor) -> dict[str, float]:
    """Angle norm (‖G‖ per block: how far from the identity) and max |RᵀR − I| for one layer."""
    A = A.detach()
    G = A.float() - A.float().transpose(-1, -2)
    R = rotations(A)
    eye = torch.eye(BLOCK)
    ortho = (R.transpose(-1, -2) @ R - eye).abs().max().item()
    norms = torch.linalg.matrix_norm(G, ord="fro")
    return {
        "angle_norm_mean": float(norms.mean()),
        "angle_norm_max": float(norms.max()),
        "max_abs_RtR_minus_I": float(ortho),
        "det_min": float(torch.linalg.det(R.double()).min()),
    }


def save_gates(path: str | Path, gates: dict[int, torch.Tensor], hidden_size: int) -> None:
    """Write ``layers.<i>.A`` tensors (float32 [k, 8, 8]) with metadata, atomically."""
    from safetensors.torch import save

    from shared import atomic

    tensors = {f"layers.{i}.A": A.detach().float().contiguous().cpu() for i, A in sorted(gates.items())}
    meta = {
        "format": "so8t-gates/1",
        "layer_indices": json.dumps(sorted(gates)),
        "hidden_size": str(hidden_size),
        "convention": CONVENTION,
    }
    atomic.write_bytes(path, save(tensors, metadata=meta))


def load_gates(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, str]]:
    """Read a gates file; raises ValueError naming the file when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gates file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            gates = {}
            for key in f.keys():
                parts = key.split(".")
                if len(parts) != 3 or parts[0] != "layers" or parts[2] != "A" or not parts[1].isdigit():
                    raise ValueError(f"{path}: unexpected tensor {key!r}")
                A = f.get_tensor(key)
                if A.ndim != 3 or A.shape[1:] != (BLOCK, BLOCK):
                    raise ValueError(f"{path}: {key} has shape {tuple(A.shape)}, expected [k, 8, 8]")
                gates[int(parts[1])] = A.float()
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable gates file ({err})") from None
    if meta.get("format") != "so8t-gates/1":
        raise ValueError(f"{path}: not an so8t gates file (metadata format={meta.get('format')!r})")
    return gates, meta
