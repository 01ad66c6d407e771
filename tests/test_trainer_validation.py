"""Replies during validation: a model taught a record's reply writes the format and that verdict, read against the
record's reference; the pass leaves every RNG state and module mode as it found them."""

from __future__ import annotations

import json
import random

import torch

from services.trainer import data
from services.trainer.gates import attach_gates
from services.trainer.objective import Objective
from services.trainer.validation import Validation
from shared.think_format import Thinking, render_assistant, render_chat, system_prompt


def _record(label: str, taught_verdict: str) -> dict:
    reply = render_assistant(Thinking(f"計算の質問です。\n判定: {taught_verdict}"), "4です。", "simple")
    messages = [
        {"role": "system", "content": system_prompt("simple")},
        {"role": "user", "content": "2+2は？"},
        {"role": "assistant", "content": reply},
    ]
    return {"id": label, "messages": messages, "text": render_chat(messages), "four_class_label": label}


def _write(path, rec):
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def test_replies_during_validation(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Phi3ForCausalLM

    from shared.tiny import teach

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    right = data.load(_write(tmp_path / "right.jsonl", _record("ALLOW", "ALLOW")), tok, seq_len=512)
    # the same prompt and reply, but the record's reference says DENY: format right, verdict wrong
    wrong = data.load(_write(tmp_path / "wrong.jsonl", _record("DENY", "DENY")), tok, seq_len=512)
    ex = right.examples[0]
    targets = [i for i, t in enumerate(ex.labels) if t != data.IGNORE]
    taught = teach(
        tiny_model_dir,
        tmp_path / "taught",
        ex.input_ids[: targets[-1] + 1],
        start=targets[0],
        steps=300,
        stop_loss=1e-3,
    )
    model = Phi3ForCausalLM.from_pretrained(taught, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))  # B = 0: no change
    gates = attach_gates(peft, None, None, init_scale=0.0)  # the identity rotation
    objective = Objective(peft, gates, pet_enabled=False, huber_delta=0.0)
    objective.train()
    cpu = torch.device("cpu")
    n_reply = len(targets) + 4
    rng = (torch.get_rng_state(), random.getstate())
    v = Validation(right, 1, tok.pad_token_id, cpu, tokenizer=tok, generate_records=8, generate_tokens=n_reply)
    point = v.run(objective, 1)
    assert (point["generated"], point["format"], point["label_accuracy"]) == (1, 1.0, 1.0), point
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert all(m.training for m in objective.modules())  # modes put back
    assert v.summary()["generate_records"] == 1 and v.summary()["last"] == point

    other = Validation(wrong, 1, tok.pad_token_id, cpu, tokenizer=tok, generate_records=1, generate_tokens=n_reply)
    assert other.samples()[0][1] == "DENY"
    point = other.run(objective, 1)
    assert (point["format"], point["label_accuracy"]) == (1.0, 0.0), point
    # too few tokens to reach the final part: not in the format
    short = Validation(right, 1, tok.pad_token_id, cpu, tokenizer=tok, generate_records=1, generate_tokens=5)
    assert short.run(objective, 1)["format"] == 0.0
    off = Validation(right, 1, tok.pad_token_id, cpu, tokenizer=tok, generate_records=0)
    assert "format" not in off.run(objective, 1)
