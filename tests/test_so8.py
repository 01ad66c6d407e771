"""The SO(8) gate maths (shared/so8.py): rotations, the gated linear layer and its fold, the gates file."""

from __future__ import annotations

import pytest
import torch

from shared import so8


@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_rotations_are_orthogonal_with_det_plus_one(scale):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(48, 8, 8, generator=g) * scale
    R = so8.rotations(A)
    assert R.dtype == torch.float32 and R.shape == (48, 8, 8)
    eye = torch.eye(8).expand(48, 8, 8)
    assert (R.transpose(-1, -2) @ R - eye).abs().max() < 1e-6
    assert (torch.linalg.det(R.double()) - 1).abs().max() < 1e-6
    # float64 reference: the float32 exponential is the true matrix exponential of A - Aᵀ
    ref = torch.linalg.matrix_exp((A - A.transpose(-1, -2)).double())
    assert (R.double() - ref).abs().max() < 1e-5
    assert so8.orthogonality_error(R) < 1e-12


def test_rotation_depends_only_on_the_skew_part():
    A = torch.randn(4, 8, 8)
    S = torch.randn(4, 8, 8)
    S = S + S.transpose(-1, -2)  # symmetric part adds nothing to A - Aᵀ
    assert torch.allclose(so8.rotations(A), so8.rotations(A + S), atol=1e-6)


def test_gated_linear_equals_folded_weight():
    torch.manual_seed(0)
    D, out = 64, 48
    lin = torch.nn.Linear(D, out, bias=False)
    gate = so8.SO8Gate(D, init_scale=0.3)
    x = torch.randn(3, 5, D)
    gated = lin(gate(x))
    R = gate.rotation().detach()
    W_fold = so8.fold_into_weight(lin.weight.detach(), R)
    assert torch.allclose(W_fold, lin.weight.detach() @ so8.block_diag(R), atol=1e-6)
    assert (gated - x @ W_fold.T).abs().max() < 1e-6
    # column convention: block n of the input becomes R_n x_n
    xb = x.reshape(3, 5, D // 8, 8)
    manual = torch.einsum("kij,btkj->btki", R, xb).reshape(3, 5, D)
    assert (gate(x) - manual).abs().max() < 1e-6


def test_init_scale_zero_is_the_exact_identity():
    gate = so8.SO8Gate(32, init_scale=0.0)
    x = torch.randn(2, 7, 32)
    assert torch.equal(gate.rotation(), torch.eye(8).expand(4, 8, 8))
    assert torch.equal(gate(x), x)


def test_gate_is_trainable_and_stays_orthogonal():
    torch.manual_seed(0)
    gate = so8.SO8Gate(16, init_scale=0.05)
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    x, target = torch.randn(32, 16), torch.randn(32, 16)
    first = None
    for _ in range(30):
        loss = ((gate(x) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert so8.rotation_stats(gate.A)["max_abs_RtR_minus_I"] < 1e-5


def test_fold_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="input features"):
        so8.fold_into_weight(torch.zeros(4, 24), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        so8.SO8Gate(20)


def test_gates_file_round_trip_and_corruption(tmp_path):
    gates = {0: torch.randn(4, 8, 8), 3: torch.randn(4, 8, 8)}
    path = tmp_path / "so8t_gates.safetensors"
    so8.save_gates(path, gates, hidden_size=32)
    back, meta = so8.load_gates(path)
    assert sorted(back) == [0, 3] and all(torch.equal(back[i], gates[i]) for i in gates)
    assert meta["hidden_size"] == "32" and meta["layer_indices"] == "[0, 3]"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable gates file"):
        so8.load_gates(path)
    with pytest.raises(FileNotFoundError):
        so8.load_gates(tmp_path / "missing.safetensors")
