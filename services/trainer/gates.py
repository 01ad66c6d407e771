"""Attach SO(8) rotation gates to a Phi-3 model: the one implementation of the gated forward.

The gate rotates the INPUT of ``model.layers[i].self_attn.o_proj`` (block n -> R_n x_n, shared.so8), as a
forward pre-hook on the o_proj module. On a PEFT model o_proj is the LoRA wrapper, so the base weight and the
LoRA branch both see the rotated input and the exact bake is W' = (W + (α/r)·B·A) @ blockdiag(R). Attach AFTER
the LoRA layers are in place (get_peft_model / PeftModel.from_pretrained): a hook on a module PEFT later wraps
would rotate the base branch only.

Each gate is registered as ``self_attn.so8t_gate``, so it moves with the model and DDP synchronises it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from shared.so8 import BLOCK, SO8Gate, orthogonality_error, rotations

_ATTN_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")
GATE_ATTR = "so8t_gate"


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: self_attn module} for a plain, PEFT-wrapped or DDP-wrapped Phi-3."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        m = _ATTN_RE.search(name)
        if m and hasattr(module, "o_proj"):
            i = int(m.group(1))
            if i in found and found[i] is not module:
                raise ValueError(f"two attention modules claim layer {i} (…{name})")
            found[i] = module
    if not found:
        raise ValueError("no `layers.<i>.self_attn.o_proj` modules found: not a Phi-3-style model")
    return dict(sorted(found.items()))


def _in_features(o_proj: nn.Module) -> int:
    n = getattr(o_proj, "in_features", None)  # nn.Linear, bitsandbytes 8/4-bit linears, PEFT LoRA layers
    if n is None:
        raise ValueError(f"cannot tell the input size of {type(o_proj).__name__}")
    return int(n)


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def attach_gates(
    model: nn.Module,
    gates: dict[int, torch.Tensor] | None,
    layer_indices: Iterable[int] | None,
    init_scale: float,
    seed: int | None = None,
) -> dict[int, SO8Gate]:
    """Put a trainable SO8Gate on the o_proj input of each chosen layer; returns {layer index: gate}.

    `gates` (e.g. from shared.so8.load_gates) sets the A parameters and the layers; otherwise the gates are new,
    A ~ N(0, init_scale²) from a generator seeded with `seed` (init_scale 0: the exact identity).
    `layer_indices` None means every layer (or exactly the layers of `gates`).
    """
    attn = attention_modules(model)
    if gates is not None:
        wanted = sorted(gates)
        if layer_indices is not None and sorted(layer_indices) != wanted:
            raise ValueError(f"gates cover layers {wanted} but layer_indices is {sorted(layer_indices)}")
    else:
        wanted = sorted(attn) if layer_indices is None else sorted(set(layer_indices))
    missing = [i for i in wanted if i not in attn]
    if missing:
        raise ValueError(f"gate layer indices {missing} out of range: the model has layers 0-{max(attn)}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: dict[int, SO8Gate] = {}
    for i in wanted:
        module = attn[i]
        if hasattr(module, GATE_ATTR):
            raise ValueError(f"layer {i} already has an SO(8) gate")
        o_proj: nn.Module = module.o_proj  # type: ignore[assignment]  # a Linear, an 8/4-bit or a LoRA layer
        hidden = _in_features(o_proj)
        gate = SO8Gate(hidden, init_scale=init_scale, generator=generator)
        if gates is not None:
            A = gates[i]
            if tuple(A.shape) != (hidden // BLOCK, BLOCK, BLOCK):
                raise ValueError(
                    f"gate of layer {i} has shape {tuple(A.shape)}, o_proj needs [{hidden // BLOCK}, {BLOCK}, {BLOCK}]"
                )
            with torch.no_grad():
                gate.A.copy_(A.float())
        gate.to(_device(o_proj))
        module.add_module(GATE_ATTR, gate)
        gate.hook_input_of(o_proj)
        out[i] = gate
    return out


def _batched(gates: dict[int, SO8Gate]) -> torch.Tensor:
    """Every gate's rotation, [Σk, 8, 8], in one matrix_exp (per device when the gates are spread over several)."""
    As: list[torch.Tensor] = [g.A for g in gates.values()]
    return rotations(torch.cat(As)) if len({a.device for a in As}) == 1 else torch.cat([rotations(a) for a in As])


def _hand_out(gates: dict[int, SO8Gate], R: torch.Tensor) -> None:
    start = 0
    for g in gates.values():
        k = g.A.shape[0]
        g.use_rotation(R[start : start + k])
        start += k


def precompute_rotations(gates: dict[int, SO8Gate]) -> torch.Tensor:
    """Compute every gate's rotation in one batched matrix_exp and hand it to the hooks; returns all R [Σk, 8, 8].

    For a forward outside a training step (validation, tests): one exponential for all layers instead of one per
    layer (and per gradient-checkpoint recompute, which reuses these tensors). A hook ignores the cache once the
    optimizer has changed A (the version counter moves), so a stale rotation is never applied.
    """
    if not gates:
        return torch.zeros(0, BLOCK, BLOCK)
    R = _batched(gates)
    _hand_out(gates, R)
    return R


class StepRotations:
    """The rotations of one optimizer step: computed once, shared by every forward of the step, differentiated once.

    A does not change within a step, so every micro-batch rotates with the same R. The gates are handed `leaf`, a
    detached copy of R that collects ∂loss/∂R over all the step's forwards; `backward` then turns the sum into
    ∂loss/∂A with one matrix_exp backward (the chain rule is linear in ∂loss/∂R, so this is the gradient the
    per-forward graphs would give, up to float rounding). That removes the exponential and its backward (the
    gate's largest cost) from every forward but one per step.

    The orthogonality regulariser depends on A only: `backward` adds its gradient once, for the whole step.
    Under DDP the gate parameters stay outside DDP's reducer (`Run.build`); `backward(average=…)` averages
    ∂loss/∂R over the ranks instead, so every rank applies the same update.
    """

    def __init__(self, gates: dict[int, SO8Gate]):
        self.gates = gates
        self.R = _batched(gates)
        self.leaf = self.R.detach().requires_grad_()
        _hand_out(gates, self.leaf)

    def orthogonality(self) -> float:
        return float(orthogonality_error(self.leaf.detach()))

    def backward(self, ortho_weight: float, average=None, scale=None) -> None:
        """A.grad += ∂(step loss)/∂A. `average`: in-place mean over DDP ranks of a tensor; `scale`: the fp16 grad
        scaler's scale (the leaf's gradient is scaled already, the regulariser's is scaled here)."""
        grad = self.leaf.grad if self.leaf.grad is not None else torch.zeros_like(self.leaf)
        if average is not None:
            grad = average(grad)
        surrogate = (self.R * grad).sum()
        if ortho_weight:
            reg = ortho_weight * orthogonality_error(self.R)
            surrogate = surrogate + (scale(reg) if scale is not None else reg)
        surrogate.backward()
        clear_rotations(self.gates)
        self.leaf.grad = None


def clear_rotations(gates: dict[int, SO8Gate]) -> None:
    for g in gates.values():
        g.use_rotation(None)


def detach_gates(model: nn.Module) -> None:
    """Remove every gate attach_gates put on `model` (hooks and submodules)."""
    for module in attention_modules(model).values():
        gate = getattr(module, GATE_ATTR, None)
        if gate is not None:
            gate.unhook()
            delattr(module, GATE_ATTR)


def gate_tensors(gates: dict[int, SO8Gate]) -> dict[int, torch.Tensor]:
    """{layer: A} detached float32 on the CPU, ready for shared.so8.save_gates."""
    return {i: g.A.detach().float().cpu() for i, g in gates.items()}


def orthogonality(gates: dict[int, SO8Gate], R: torch.Tensor | None = None) -> torch.Tensor:
    """The regulariser: mean over gated layers of mean ‖RᵀR − I‖² (a graph-carrying scalar).

    `R`: the rotations from precompute_rotations (all layers have the same block count, so the mean over
    every block equals the mean over layers of the per-layer means).
    """
    if R is not None:
        return orthogonality_error(R)
    return torch.stack([orthogonality_error(g.rotation()) for g in gates.values()]).mean()
