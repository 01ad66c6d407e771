"""Packing (train.packing): first-fit rows, block-diagonal attention on the tiny Phi-3, labels and PET bounded by
the record boundaries, the objective of a packed row equal to that of its records one by one, and a packed
training run equal to the unpacked one (the same update per step, up to float rounding).

Exact resume with packing is in test_trainer_resume.py, DDP with packing in test_trainer_ddp.py.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, sft_records, tiny_train_config, trainer_cmd, write_dataset

from services.trainer.data import IGNORE, Example, first_fit, micro_batches, packed, padded
from shared.pet import pet_loss, pet_sequence_sum, valid_triples


def _examples(tokenizer, n: int = 6, seq_len: int = 4096) -> list[Example]:
    from services.trainer.data import assistant_spans, tokenize

    return [tokenize(tokenizer, *assistant_spans(r, f"x:{i}"), seq_len) for i, r in enumerate(sft_records(n))]


def _toy(*lengths: int) -> list[Example]:
    out = []
    for k, n in enumerate(lengths):
        ids = [100 * (k + 1) + t for t in range(n)]
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    return out


# --- rows --------------------------------------------------------------------------------------------------------


def test_first_fit_fills_the_first_row_with_room_and_keeps_the_order():
    assert first_fit([5, 4, 3, 2, 6, 1], 8) == [[0, 2], [1, 3, 5], [4]]  # 1 fits row 2, not row 1 (full)
    assert first_fit([8, 8], 8) == [[0], [1]]
    assert first_fit([], 8) == []
    rows = first_fit([3, 7, 2, 5, 1, 4, 4, 6], 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum([3, 7, 2, 5, 1, 4, 4, 6][i] for i in r) <= 10 for r in rows)
    assert all(r == sorted(r) for r in rows)
    with pytest.raises(ValueError, match="more than a row"):
        first_fit([3, 9], 8)


def test_packed_rows_restart_positions_and_never_label_across_a_boundary():
    a, b, c = _toy(5, 3, 4)
    batch = packed([[a, b], [c]], pad_id=0)
    assert batch.attention_mask is None and batch.input_ids.shape == (2, 8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch.segments.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [3, 3, 3, 3, 0, 0, 0, 0]]
    assert batch.input_ids[0].tolist() == a.input_ids + b.input_ids
    assert batch.input_ids[1, 4:].tolist() == [0, 0, 0, 0]  # padding: its own block (positions restart), no label
    labels = batch.labels.tolist()
    # each record's own labels, except its first token: nothing before it in the row may predict it
    assert labels[0] == [IGNORE, *a.labels[1:], IGNORE, *b.labels[1:]]
    assert labels[1] == [IGNORE, *c.labels[1:], IGNORE, IGNORE, IGNORE, IGNORE]
    # the same targets as the records one by one
    n_targets = int((batch.labels[:, 1:] != IGNORE).sum())
    assert n_targets == a.n_targets + b.n_targets + c.n_targets
    assert batch.real_tokens == 12


def test_micro_batches_pack_a_steps_records_in_stream_order():
    recs = _toy(5, 4, 3, 2, 6, 1)
    groups = [recs[:2], recs[2:4], recs[4:]]  # three micro-batches of batch_size 2
    unpacked = micro_batches(groups, packing=False, seq_len=8, pad_id=0)
    assert [b.input_ids.shape for b in unpacked] == [(2, 5), (2, 3), (2, 6)]
    rows = micro_batches(groups, packing=True, seq_len=8, pad_id=0)
    assert [b.input_ids.shape for b in rows] == [(1, 8), (1, 7), (1, 6)]  # first-fit: [5, 3], [4, 2, 1], [6]
    assert rows[1].input_ids[0].tolist() == recs[1].input_ids + recs[3].input_ids + recs[5].input_ids
    assert sum(b.real_tokens for b in rows) == sum(b.real_tokens for b in unpacked) == 21


# --- PET ---------------------------------------------------------------------------------------------------------


def test_pet_never_spans_two_records():
    torch.manual_seed(0)
    h1, h2 = torch.randn(1, 5, 3), torch.randn(1, 4, 3)
    row = torch.cat([h1, h2], dim=1)
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2]])
    valid = valid_triples(segments)[0].tolist()
    assert valid == [True, True, True, False, False, True, True]  # the two triples across the boundary are out
    want = pet_loss(h1) + pet_loss(h2)
    assert pet_sequence_sum(row, segments).item() == pytest.approx(want.item(), rel=1e-6)
    # token-weighted over the row's valid triples: 3 of record 1, 2 of record 2
    both = (pet_loss(h1) * 3 + pet_loss(h2) * 2) / 5
    assert pet_loss(row, segments).item() == pytest.approx(both.item(), rel=1e-6)
    # a large jump at the boundary changes nothing
    row2 = row.clone()
    row2[0, 5:] += 1e3
    assert pet_sequence_sum(row2, segments).item() == pytest.approx(want.item(), rel=1e-4)
    # padding (0) and records too short for a triple add nothing; the sum is per record, whatever the batching
    pad = torch.cat([row, torch.randn(1, 3, 3) * 1e3], dim=1)
    seg_pad = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0]])
    assert pet_sequence_sum(pad, seg_pad).item() == pytest.approx(want.item(), rel=1e-6)
    two_rows = torch.cat([torch.cat([h1, torch.zeros(1, 0, 3)], 1), torch.cat([h2, torch.zeros(1, 1, 3)], 1)], 0)
    seg_rows = torch.tensor([[1, 1, 1, 1, 1], [2, 2, 2, 2, 0]])
    assert pet_sequence_sum(two_rows, seg_rows).item() == pytest.approx(want.item(), rel=1e-6)


# --- the model: block-diagonal attention ------------------------------------------------------------------------


def _gated_lora(tiny_model_dir, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from services.trainer.gates import attach_gates

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    gates = attach_gates(model, None, None, init_scale=0.3, seed=0)
    return model.eval(), gates


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_records_logits_do_not_change_when_others_are_packed_beside_it(tiny_model_dir, tiny_tokenizer, attn):
    model, _ = _gated_lora(tiny_model_dir, attn)
    a, b, c = _examples(tiny_tokenizer, 3)

    def logits(batch):
        with torch.no_grad():
            # no KV cache, as in training: transformers reads packed rows from position_ids only without one
            return model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits

    alone = logits(padded([a], tiny_tokenizer.pad_token_id))[0]
    n = len(a.input_ids)
    for row, at in (([a, b], 0), ([b, a], len(b.input_ids)), ([c, a, b], len(c.input_ids))):
        got = logits(packed([row], tiny_tokenizer.pad_token_id))[0, at : at + n]
        assert (got - alone).abs().max().item() < 1e-5, [len(e.input_ids) for e in row]
    # the boundary is what keeps them apart: the same tokens as one sequence give other logits for `a`
    joined = Example(b.input_ids + a.input_ids, b.labels + a.labels)
    mixed = logits(padded([joined], tiny_tokenizer.pad_token_id))[0, len(b.input_ids) :]
    assert (mixed - alone).abs().max().item() > 1e-2


def test_packed_objective_equals_the_records_one_by_one(tiny_model_dir, tiny_tokenizer):
    from services.trainer.objective import Objective

    model, gates = _gated_lora(tiny_model_dir)
    obj = Objective(model, gates, pet_enabled=True, huber_delta=0.0).eval()
    recs = _examples(tiny_tokenizer, 4)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        singles = [obj(**padded([e], pad).inputs()) for e in recs]
        row = obj(**packed([recs], pad).inputs())
        two = obj(**packed([recs[:2], recs[2:]], pad).inputs())
        batch = obj(**padded(recs, pad).inputs())
    for got in (row, two, batch):
        lm, pet, _, correct = got
        assert lm.item() == pytest.approx(sum(s[0].item() for s in singles), rel=1e-5)
        assert pet.item() == pytest.approx(sum(s[1].item() for s in singles), rel=1e-5)
        assert correct.item() == sum(s[3].item() for s in singles)


# --- a packed run trains like the unpacked one --------------------------------------------------------------------


STEPS = 3


def _settings(packing: bool) -> dict:
    return dict(
        train={
            "max_steps": STEPS,
            "seq_len": 1024,
            "batch_size": 2,
            "grad_accum": 2,
            "num_threads": 1,
            "deterministic": True,
            "packing": packing,
            "eval_steps": None,
        },
        lora={"dropout": 0.0},  # dropout draws differ with the tensor shapes
        checkpoint={"save_steps": STEPS, "keep": 1, "save_minutes": None},
        logging={"log_steps": 1, "tensorboard": False},
    )


@pytest.mark.slow
def test_a_packed_run_makes_the_same_updates_as_the_unpacked_one(tmp_path, tiny_model_dir):
    ds = write_dataset(tmp_path / "train.jsonl")
    env = dict(os.environ, SO8T_PROGRESS="0", OMP_NUM_THREADS="1")
    outs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        cfg = tiny_train_config(tmp_path / f"{packing}.yaml", **_settings(packing))
        r = subprocess.run(
            trainer_cmd(cfg, ds, out, tiny_model_dir), capture_output=True, text=True, env=env, cwd=REPO, timeout=300
        )
        assert r.returncode == 0, r.stderr[-4000:]
        outs[packing] = out
    a = load_file(str(outs[False] / "final" / "adapter_model.safetensors"))
    b = load_file(str(outs[True] / "final" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-4  # it did train
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"packed and unpacked adapters differ by {worst}"
    ma = json.loads((outs[False] / "final" / "manifest.json").read_text())["metrics"]["final_losses"]
    mb = json.loads((outs[True] / "final" / "manifest.json").read_text())["metrics"]["final_losses"]
    assert mb["lm"] == pytest.approx(ma["lm"], rel=1e-5) and mb["pet"] == pytest.approx(ma["pet"], rel=1e-5)
    state = json.loads((outs[True] / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["data_position"] == 2 * STEPS  # the stream position counts micro-batches, packed or not
