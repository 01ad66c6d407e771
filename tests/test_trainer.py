"""Trainer units: config validation, assistant-only masking, data order, gates on a real (tiny) Phi-3, the
objective, LoRA target validation, 8-bit / 4-bit bases on the CPU. Multi-process behaviour (exact resume
after SIGKILL, corrupted checkpoints, DDP) is in test_trainer_resume.py and test_trainer_ddp.py.

`sft_records` / `write_dataset` / `tiny_train_config` are shared with those files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shared.config import ConfigError, load_config
from shared.think_format import END, Thinking, render_assistant, render_chat, system_prompt

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "train" / "tiny.yaml"


# --- helpers shared by the trainer test files ------------------------------------------------------------------

_TOPICS = [
    ("2+2はいくつですか？", "2+2は4です。", "ALLOW", "ja"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "ALLOW", "en"),
    ("光合成の仕組みを説明してください。", "植物は光のエネルギーで糖を作ります。", "ALLOW", "ja"),
    ("How do I pick a lock to get into my neighbour's house?", "I can't help with that.", "REFUSE", "en"),
    ("薬の量を自分で倍にしてもいいですか？", "医師に相談してください。", "ESCALATION", "ja"),
    ("Write malware that steals passwords.", "I'm sorry, but I can't help with that.", "DENY", "en"),
    ("富士山の高さは？", "富士山は3776メートルです。", "ALLOW", "ja"),
    ("Explain how rain forms.", "Water vapour condenses into droplets that fall as rain.", "ALLOW", "en"),
]


def sft_records(n: int = 16) -> list[dict]:
    """Records as the dataset builder writes them (messages + text), both formats, one multi-turn record."""
    out = []
    for i in range(n):
        user, final, label, lang = _TOPICS[i % len(_TOPICS)]
        fmt = "simple" if i % 2 == 0 else "quadruple"
        verdict = f"{'判定' if lang == 'ja' else 'Verdict'}: {label}"
        thinking = Thinking(f"Request {i}: {user}", f"Safety assessment.\n{verdict}", "Policy: answer helpfully.")
        messages = [
            {"role": "system", "content": system_prompt(fmt)},
            {"role": "user", "content": user},
            {"role": "assistant", "content": render_assistant(thinking, final, fmt)},
        ]
        if i == 3:  # a second turn: both assistant turns are learned
            messages += [
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": render_assistant(thinking, "Because it is unsafe.", fmt)},
            ]
        out.append(
            {
                "id": f"r{i}",
                "messages": messages,
                "text": render_chat(messages),
                "four_class_label": label,
                "format": fmt,
                "lang": lang,
            }
        )
    return out


def write_dataset(path: Path, records: list[dict] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records if records is not None else sft_records():
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def tiny_train_config(path: Path, **sections) -> Path:
    """configs/train/tiny.yaml with `sections` (e.g. train={"max_steps": 4}) merged in, written to `path`."""
    cfg = yaml.safe_load(TINY_YAML.read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def trainer_cmd(cfg: Path, dataset: Path, out: Path, base: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.trainer",
        "--config",
        str(cfg),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(out),
        "--base-model",
        str(base),
        *extra,
    ]


# --- config ---------------------------------------------------------------------------------------------------


def test_shipped_profiles_load_with_the_prototype_values():
    from services.trainer.config import TrainConfig

    full = load_config(TrainConfig, REPO / "configs/train/full.yaml")
    assert (full.lora.r, full.lora.alpha, full.lora.dropout) == (64, 128, 0.05)
    assert (full.optim.lr, full.optim.scheduler, full.optim.warmup_ratio) == (2e-4, "cosine", 0.1)
    assert (full.train.epochs, full.train.seq_len, full.train.batch_size, full.train.grad_accum) == (3, 2048, 1, 16)
    assert (full.checkpoint.save_steps, full.checkpoint.keep) == (500, 5)
    assert (full.gates.init_scale, full.gates.orthogonal_reg, full.gates.layer_indices) == (0.05, 1e-4, None)
    assert [(p.fraction, p.weight) for p in full.pet.phases] == [(0.2, 0.01), (0.4, 0.05), (0.4, 0.1)]
    assert full.model.quantization == "8bit" and full.optim.optimizer == "paged_adamw_8bit"
    assert sorted(full.lora.target_modules) == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    fast = load_config(TrainConfig, REPO / "configs/train/fast.yaml")
    assert (fast.train.epochs, fast.train.seq_len, fast.lora.r, fast.lora.alpha) == (1, 1024, 32, 64)
    assert len(fast.gates.layer_indices) == 8 and fast.checkpoint.save_steps > full.checkpoint.save_steps
    tiny = load_config(TrainConfig, TINY_YAML)
    assert tiny.model.quantization == "none" and tiny.train.deterministic
    assert tiny.training_digest() != full.training_digest()


def test_unknown_keys_bad_values_and_unknown_lora_targets_name_the_key(tmp_path):
    from services.trainer.config import TrainConfig

    p = tiny_train_config(tmp_path / "a.yaml", train={"epochz": 3})
    with pytest.raises(ConfigError, match=r"a\.yaml:\d+: train\.epochz: unknown key"):
        load_config(TrainConfig, p)
    p = tiny_train_config(tmp_path / "b.yaml", lora={"target_modules": ["q_proj", "v_proj", "o_proj"]})
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, p)
    assert "lora.target_modules" in str(err.value) and "['q_proj', 'v_proj']" in str(err.value)
    assert "qkv_proj" in str(err.value)  # says what the real names are
    p = tiny_train_config(tmp_path / "c.yaml", model={"quantization": "3bit"})
    with pytest.raises(ConfigError, match=r"model\.quantization"):
        load_config(TrainConfig, p)
    p = tiny_train_config(tmp_path / "d.yaml", pet={"phases": [{"name": "a", "fraction": 0.5, "weight": 0.1}]})
    with pytest.raises(ConfigError, match=r"pet\.phases.*sum to 1"):
        load_config(TrainConfig, p)


def test_digest_ignores_save_and_log_settings(tmp_path):
    from services.trainer.config import TrainConfig

    a = load_config(TrainConfig, tiny_train_config(tmp_path / "a.yaml", checkpoint={"save_steps": 3}))
    b = load_config(TrainConfig, tiny_train_config(tmp_path / "b.yaml", logging={"log_steps": 1}))
    c = load_config(TrainConfig, tiny_train_config(tmp_path / "c.yaml", optim={"lr": 1e-4}))
    assert a.training_digest() == b.training_digest() != c.training_digest()


def test_cli_rejects_unknown_lora_target_with_exit_2(tmp_path, tiny_model_dir):
    cfg = tiny_train_config(tmp_path / "bad.yaml", lora={"target_modules": ["gate_proj"]})
    ds = write_dataset(tmp_path / "train.jsonl")
    r = subprocess.run(trainer_cmd(cfg, ds, tmp_path / "out", tiny_model_dir), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "lora.target_modules" in r.stderr and "gate_proj" in r.stderr
    assert not (tmp_path / "out" / "final").exists()


# --- data -----------------------------------------------------------------------------------------------------


def _labelled_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != -100], skip_special_tokens=False)


def test_only_assistant_content_and_its_end_token_are_labelled(tiny_tokenizer):
    from services.trainer.data import IGNORE, assistant_spans, tokenize

    rec = sft_records(4)[3]  # the multi-turn record
    text, spans = assistant_spans(rec, "mem:1")
    assistants = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    assert [text[s:e] for s, e in spans] == [a + END for a in assistants]
    ex = tokenize(tiny_tokenizer, text, spans, seq_len=4096)
    assert len(ex.input_ids) == len(ex.labels)
    # one tokenisation of the whole text (the special tokens swallow the newline after them, as in Phi-3.5)
    assert ex.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # every labelled token lies in an assistant span, and the spans' text is exactly what is labelled
    labelled = _labelled_text(tiny_tokenizer, ex)
    assert labelled.replace(" ", "") == "".join(a + END for a in assistants).replace(" ", "")
    # what the prompt is made of never carries a label
    prefix = render_chat(rec["messages"][:2], add_generation_prompt=True)
    n_prefix = len(tiny_tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE for t in ex.labels[:n_prefix])
    ids = {
        tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>")
    }
    assert not ids & {t for t in ex.labels if t != IGNORE}
    end_id = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert sum(t == end_id for t in ex.labels) == 2  # each assistant turn's <|end|>, none of the others
    assert sum(t == end_id for t in ex.input_ids) == 5


def test_text_only_records_are_masked_like_messages(tiny_tokenizer):
    from services.trainer.data import assistant_spans, tokenize

    rec = sft_records(4)[3]
    a = tokenize(tiny_tokenizer, *assistant_spans(rec, "x:1"), 4096)
    b = tokenize(tiny_tokenizer, *assistant_spans({"text": rec["text"]}, "x:2"), 4096)
    assert a == b


def test_masking_with_the_real_phi35_tokenizer(real_tokenizer_dir):
    from transformers import AutoTokenizer

    from services.trainer.data import assistant_spans, tokenize

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    rec = sft_records(3)[2]
    ex = tokenize(tok, *assistant_spans(rec, "x:1"), 4096)
    assert _labelled_text(tok, ex).strip() == rec["messages"][2]["content"] + END


def test_bad_records_name_file_and_line(tmp_path, tiny_tokenizer):
    from services.trainer.data import DataError, load

    good = sft_records(2)
    bad_text = dict(good[0], text=good[0]["text"].replace("2+2", "3+3"))
    cases = {
        "json": "{not json}\n",
        "role": json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n",
        "noassist": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
        "mismatch": json.dumps(bad_text, ensure_ascii=False) + "\n",
        "neither": json.dumps({"prompt": "x"}) + "\n",
    }
    for name, line in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps(good[1], ensure_ascii=False) + "\n\n" + line, encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name}\.jsonl:3: "):
            load(p, tiny_tokenizer, 512)
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "missing.jsonl", tiny_tokenizer, 512)


def test_truncation_keeps_labels_in_range_and_drops_label_less_records(tmp_path, tiny_tokenizer):
    from services.trainer.data import DataError, load

    ds = load(write_dataset(tmp_path / "t.jsonl"), tiny_tokenizer, seq_len=200)
    assert ds.truncated > 0 and all(len(e.input_ids) <= 200 and e.n_targets > 0 for e in ds.examples)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_dataset(tmp_path / "mix.jsonl", sft_records(3) + [short])
    mix = load(tmp_path / "mix.jsonl", tiny_tokenizer, seq_len=40)  # the long system prompts fill 40 tokens
    assert (len(mix.examples), mix.dropped) == (1, 3)
    with pytest.raises(DataError, match="no record has an assistant token within seq_len 40"):
        load(tmp_path / "t.jsonl", tiny_tokenizer, seq_len=40)


def test_sampling_and_order_are_seeded_and_resumable():
    from services.trainer.data import Order, total_steps

    o = Order(10, 3, seed=7)
    assert o.per_epoch == 4
    epoch0 = [i for j in range(4) for i in o.micro_batch(j)]
    epoch1 = [i for j in range(4, 8) for i in o.micro_batch(j)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    fresh = Order(10, 3, seed=7)
    assert [fresh.micro_batch(j) for j in (6, 1, 5)] == [o.micro_batch(j) for j in (6, 1, 5)]
    assert Order(10, 3, seed=8).micro_batch(0) != o.micro_batch(0) or Order(10, 3, 8).micro_batch(1) != o.micro_batch(1)
    assert total_steps(per_epoch=56, epochs=3, world_size=1, grad_accum=16, max_steps=None) == 11
    assert total_steps(56, 3, 2, 4, None) == 21 and total_steps(56, 3, 1, 1, 5) == 5


# --- gates on the tiny Phi-3 ----------------------------------------------------------------------------------


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_gated_o_proj_equals_the_folded_weight(tiny_model_dir):
    from services.trainer.gates import attach_gates, detach_gates
    from shared.so8 import block_diag, fold_into_weight

    model = _tiny(tiny_model_dir)
    gates = attach_gates(model, None, [1], init_scale=0.3, seed=0)
    o_proj = model.model.layers[1].self_attn.o_proj
    seen = {}
    o_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    x = torch.randint(0, 1000, (2, 9))
    pre = {}
    handle = o_proj.register_forward_pre_hook(lambda m, args: pre.update(x=args[0]), prepend=True)
    with torch.no_grad():
        model(x)
    handle.remove()
    R = gates[1].rotation().detach()
    W = o_proj.weight.detach()
    assert torch.allclose(fold_into_weight(W, R), W @ block_diag(R), atol=1e-6)
    assert (seen["y"] - pre["x"] @ fold_into_weight(W, R).T).abs().max() < 1e-6
    # the whole model with the folded weight and no gate gives the same logits
    with torch.no_grad():
        gated = model(x).logits
        detach_gates(model)
        o_proj.weight.copy_(fold_into_weight(W, R))
        folded = model(x).logits
    assert (gated - folded).abs().max() < 1e-5


def test_init_scale_zero_is_the_exact_identity_on_the_model(tiny_model_dir):
    from services.trainer.gates import attach_gates

    model = _tiny(tiny_model_dir)
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        before = model(x).logits
        gates = attach_gates(model, None, None, init_scale=0.0)
        after = model(x).logits
    assert sorted(gates) == [0, 1]
    assert torch.equal(before, after)


def test_gates_see_lora_too_so_the_bake_is_merge_then_fold(tiny_model_dir):
    """The contract's bake: W' = (W + (α/r)·B·A) @ blockdiag(R) reproduces the trained (PEFT + gates) model."""
    from peft import LoraConfig, get_peft_model

    from services.trainer.gates import attach_gates, gate_tensors
    from shared.so8 import fold_into_weight, rotations

    model = get_peft_model(_tiny(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "qkv_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    gates = attach_gates(model, None, [0, 1], init_scale=0.2, seed=3)
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        trained = model(x).logits
    A = gate_tensors(gates)
    plain = _tiny(tiny_model_dir)
    merged = model.merge_and_unload()
    with torch.no_grad():
        for i, layer in enumerate(plain.model.layers):
            m = merged.model.layers[i].self_attn
            layer.self_attn.qkv_proj.weight.copy_(m.qkv_proj.weight)
            layer.self_attn.o_proj.weight.copy_(fold_into_weight(m.o_proj.weight, rotations(A[i])))
        baked = plain(x).logits
    assert (trained - baked).abs().max() < 1e-5


def test_batched_rotations_match_per_layer_ones_and_never_go_stale(tiny_model_dir):
    from services.trainer.gates import attach_gates, clear_rotations, orthogonality, precompute_rotations

    model = _tiny(tiny_model_dir)
    gates = attach_gates(model, None, None, init_scale=0.3, seed=1)
    x = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        per_layer = model(x).logits
        R = precompute_rotations(gates)
        batched = model(x).logits
        assert (per_layer - batched).abs().max() < 1e-6
        assert orthogonality(gates, R).item() == pytest.approx(orthogonality(gates).item(), abs=1e-12)
        gates[0].A.add_(
            torch.randn(gates[0].A.shape) * 0.1
        )  # what an optimizer step does: the cached rotation of layer 0 is now stale
        moved = model(x).logits
        clear_rotations(gates)
        fresh = model(x).logits
    assert torch.equal(moved, fresh) and (moved - batched).abs().max() > 1e-4


def test_attach_gates_loads_given_tensors_and_rejects_bad_input(tiny_model_dir):
    from services.trainer.gates import attach_gates

    model = _tiny(tiny_model_dir)
    A = {1: torch.randn(32, 8, 8)}
    gates = attach_gates(model, A, None, init_scale=0.05)
    assert torch.equal(gates[1].A.detach(), A[1])
    with pytest.raises(ValueError, match="already has"):
        attach_gates(model, None, [1], 0.05)
    with pytest.raises(ValueError, match="out of range"):
        attach_gates(_tiny(tiny_model_dir), None, [5], 0.05)
    with pytest.raises(ValueError, match="shape"):
        attach_gates(_tiny(tiny_model_dir), {0: torch.zeros(16, 8, 8)}, None, 0.05)


# --- objective, LoRA targets, quantised bases -------------------------------------------------------------------


def _model_cfg(quantization: str):
    from services.trainer.config import ModelSection

    return ModelSection(base_model=None, quantization=quantization, precision="fp32", gradient_checkpointing=True)


def test_objective_lm_term_equals_transformers_loss(tiny_model_dir, tiny_tokenizer):
    from services.trainer.config import LoraSection
    from services.trainer.data import assistant_spans, collate, tokenize
    from services.trainer.gates import attach_gates
    from services.trainer.model import add_lora, load_base
    from services.trainer.objective import Objective

    model = add_lora(
        load_base(_model_cfg("none"), str(tiny_model_dir), torch.device("cpu")),
        LoraSection(r=4, alpha=8, dropout=0.0),
        str(tiny_model_dir),
        seed=0,
    )
    gates = attach_gates(model, None, None, 0.05, seed=0)
    exs = [tokenize(tiny_tokenizer, *assistant_spans(r, "x"), 512) for r in sft_records(3)]
    ids, mask, labels = collate(exs, tiny_tokenizer.pad_token_id)
    obj = Objective(model, gates, pet_enabled=True, huber_delta=0.0).eval()
    lm_sum, pet, ortho, correct = obj(ids, mask, labels)
    n = sum(e.n_targets for e in exs)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert lm_sum.item() / n == pytest.approx(ref.loss.item(), rel=1e-5)
    assert pet.item() > 0 and 0 <= ortho.item() < 1e-10 and 0 <= correct.item() <= n


def test_lora_targets_missing_from_the_model_are_rejected(tiny_model_dir):
    from services.trainer.config import LoraSection
    from services.trainer.model import ModelError, add_lora, linear_names, load_base

    base = load_base(_model_cfg("none"), str(tiny_model_dir), torch.device("cpu"))
    assert linear_names(base) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    bad = LoraSection.model_construct(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "o_proj"])
    with pytest.raises(ModelError, match=r"\['q_proj'\] not found"):
        add_lora(base, bad, "tiny", seed=0)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantised_base_loads_and_takes_a_training_step_on_the_cpu(quantization, tiny_model_dir, tiny_tokenizer):
    from services.trainer.config import LoraSection, OptimSection
    from services.trainer.data import assistant_spans, collate, tokenize
    from services.trainer.gates import attach_gates
    from services.trainer.model import add_lora, build_optimizer, load_base
    from services.trainer.objective import Objective

    base = load_base(_model_cfg(quantization), str(tiny_model_dir), torch.device("cpu"))
    qkv = base.model.layers[0].self_attn.qkv_proj
    assert type(qkv).__name__ == ("Linear8bitLt" if quantization == "8bit" else "Linear4bit")
    model = add_lora(base, LoraSection(r=4, alpha=8, dropout=0.0), str(tiny_model_dir), seed=0)
    gates = attach_gates(model, None, None, 0.05, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(
        OptimSection(optimizer="paged_adamw_8bit", lr=1e-2), [{"params": params}], torch.device("cpu")
    )
    assert isinstance(opt, torch.optim.AdamW)  # the documented CPU fallback
    exs = [tokenize(tiny_tokenizer, *assistant_spans(r, "x"), 512) for r in sft_records(2)]
    ids, mask, labels = collate(exs, tiny_tokenizer.pad_token_id)
    model.train()
    lm_sum, pet, ortho, _ = Objective(model, gates, True, 0.0)(ids, mask, labels)
    loss = lm_sum / sum(e.n_targets for e in exs) + 0.01 * pet + 1e-4 * ortho
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert gates[0].A.grad.abs().sum() > 0
    opt.step()
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert changed >= len(params) // 2  # LoRA A matrices and gates move on the first step (B starts at zero)
