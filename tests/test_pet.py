"""PET (shared/pet.py): the penalty on hand-made tensors, padding, Huber, and the three-phase λ schedule."""

from __future__ import annotations

import pytest
import torch

from shared.pet import DEFAULT_PHASES, PetSchedule, Phase, pet_loss


def test_pet_matches_a_hand_computation():
    # one sequence of 4 positions, 2 hidden units
    h = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [4.0, 0.0], [9.0, 2.0]]])
    # d2_0 = h0 - 2h1 + h2 = (2, -1); d2_1 = h1 - 2h2 + h3 = (2, 3)
    expected = (4 + 1 + 4 + 9) / 4  # mean of the squares over 2 positions x 2 units
    assert pet_loss(h).item() == pytest.approx(expected)
    assert pet_loss(h, torch.ones(1, 4)).item() == pytest.approx(expected)


def test_linear_sequences_cost_nothing():
    t = torch.arange(6.0).reshape(1, 6, 1)
    h = torch.cat([3 * t + 1, -2 * t], dim=-1)
    assert pet_loss(h).item() == pytest.approx(0.0, abs=1e-12)


def test_padding_positions_are_excluded():
    h = torch.tensor([[[0.0], [1.0], [4.0], [9.0], [100.0], [-50.0]], [[1.0], [1.0], [3.0], [0.0], [0.0], [0.0]]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    # valid triples: row 0 t=0 (d2=2), t=1 (d2=2); row 1 t=0 (d2=2); the rest touch padding
    assert pet_loss(h, mask).item() == pytest.approx((4 + 4 + 4) / 3)
    # whatever the padded positions hold does not matter
    h2 = h.clone()
    h2[0, 4:] = torch.randn(2, 1) * 1e3
    h2[1, 3:] = torch.randn(3, 1) * 1e3
    assert pet_loss(h2, mask).item() == pytest.approx(pet_loss(h, mask).item())
    # the prototype's bug: averaging zeros in would give a smaller number
    assert pet_loss(h, mask).item() > ((4 + 4 + 4) / 8)


def test_no_valid_triple_gives_zero_with_a_graph():
    h = torch.randn(1, 4, 3, requires_grad=True)
    loss = pet_loss(h, torch.tensor([[1, 1, 0, 0]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert pet_loss(torch.randn(2, 2, 3)).item() == 0.0


def test_huber_variant():
    h = torch.tensor([[[0.0], [0.0], [3.0], [0.0]]])  # d2 = 3, -6
    delta = 1.0
    huber = lambda x: 0.5 * x * x if abs(x) <= delta else delta * (abs(x) - 0.5 * delta)  # noqa: E731
    assert pet_loss(h, huber_delta=delta).item() == pytest.approx((huber(3.0) + huber(-6.0)) / 2)


def test_gradient_reaches_hidden_states():
    h = torch.randn(2, 5, 4, requires_grad=True)
    pet_loss(h, torch.ones(2, 5)).backward()
    assert h.grad.abs().sum() > 0


@pytest.mark.parametrize("total", [100, 10, 7, 1000, 3])
def test_lambda_switches_at_exactly_20_and_60_percent(total):
    s = PetSchedule(total, DEFAULT_PHASES)
    weights = [s.weight(step) for step in range(total)]
    for step, w in enumerate(weights):
        if step * 5 < total:  # step/total < 0.2
            assert w == 0.01, (step, total)
        elif step * 5 < 3 * total:  # < 0.6
            assert w == 0.05, (step, total)
        else:
            assert w == 0.1, (step, total)
    if total == 100:
        assert (s.weight(19), s.weight(20), s.weight(59), s.weight(60)) == (0.01, 0.05, 0.05, 0.1)
        assert s.boundaries() == [20, 60]
        assert [s.phase(i).name for i in (0, 20, 99)] == ["exploration", "transition", "stabilisation"]


def test_schedule_validates_phases():
    with pytest.raises(ValueError, match="sum to 1"):
        PetSchedule(10, [Phase("a", 0.5, 0.1), Phase("b", 0.4, 0.2)])
    with pytest.raises(ValueError, match="positive"):
        PetSchedule(0)
    # 0.1 + 0.2 is not 0.3 in floating point; the fractions are exact
    s = PetSchedule(10, [Phase("a", 0.1, 1.0), Phase("b", 0.2, 2.0), Phase("c", 0.7, 3.0)])
    assert [s.weight(i) for i in range(10)] == [1.0, 2.0, 2.0] + [3.0] * 7
