"""Baker: the fold is exact, the baked model reloads as stock Phi-3 and computes the trained function, a wrong
fold is caught, bad inputs fail naming the file with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.baker.bake import BakeOptions, bake
from services.baker.inputs import BakeInputError, LoraDelta
from services.baker.verify import VerificationFailed
from services.baker.weights import NonFiniteError, bake_tensor
from services.trainer.artifact import GATES
from shared import manifest, so8
from shared.phi3 import NON_STOCK_TENSOR as FORBIDDEN_NAME

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
GATE_SCALE = 0.5  # gates "trained" far away from the identity


def make_trained(base: Path, out: Path, seed: int = 0, gate_scale: float = GATE_SCALE) -> Path:
    """A trained artifact per the trainer/baker contract: PEFT LoRA with non-zero B, gates, manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PHI3_TARGETS)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # PEFT initialises B = 0: the merge would not matter
    peft_model.save_pretrained(out)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    gates = {i: torch.randn(hidden // 8, 8, 8, generator=g) * gate_scale for i in range(layers)}
    so8.save_gates(out / GATES, gates, hidden)
    m = manifest.build("train", {}, {}, "test", time.time(), {"steps": 0})
    m.update(
        {
            "base_model": str(base),
            "base_model_sha256": manifest.sha256_tree(base),
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": PHI3_TARGETS},
            "gates": {"layer_indices": sorted(gates), "init_scale": gate_scale, "hidden_size": hidden},
            "quantization": "none",
        }
    )
    manifest.write(out, m)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a shared CPU OpenMP's spinning
    threads make them ~10x slower; restored afterwards for other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_trained(tiny_model_dir, tmp_path_factory.mktemp("train") / "final")


@pytest.fixture(scope="module")
def baked_fp32(trained_dir, tmp_path_factory) -> Path:
    """Read-only for tests: copy before changing."""
    out = tmp_path_factory.mktemp("bake") / "baked"
    bake(trained_dir, out, BakeOptions(dtype="float32"))
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def transposed_fold(W, R):
    return so8.fold_into_weight(W, R.transpose(-1, -2))


# --- the fold ------------------------------------------------------------------------------------------------


def test_fold_equals_gated_lora_module():
    """A PEFT LoRA Linear behind an SO8Gate pre-hook == x @ W'ᵀ with W' = (W + s·B·A) @ blockdiag(R)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = torch.nn.Linear(64, 48, bias=False)

        def forward(self, x):
            return self.o_proj(x)

    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=12, target_modules=["o_proj"]))
    layer = model.base_model.model.o_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    gate = so8.SO8Gate(64, init_scale=0.5, generator=torch.Generator().manual_seed(1))
    layer.register_forward_pre_hook(lambda _m, args: (gate(args[0]),))
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        want = model(x)
        M = model(torch.eye(64)).T  # the linear map the gated LoRA module computes, [48, 64]
        delta = LoraDelta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])
        assert delta.scaling == 3.0  # alpha / r
        W = layer.base_layer.weight
        baked = bake_tensor(W, delta, gate.rotation())
        wrong = bake_tensor(W, delta, gate.rotation().transpose(-1, -2))
        unrotated = bake_tensor(W, delta, None)
    assert (baked - M).abs().max() <= 1e-6
    assert (x @ baked.T - want).abs().max() <= 1e-6 * want.abs().max()  # relative: outputs are O(1)
    assert (wrong - M).abs().max() > 0.05 and (unrotated - M).abs().max() > 0.05
    assert (x @ wrong.T - want).abs().max() > 0.1


def test_forbidden_tensor_names():
    for bad in (
        "model.layers.0.self_attn.so8t_gate.A",
        "model.layers.1.mlp.down_proj.lora_B.weight",
        "gates.layers.3.A",
        "model.layers.0.self_attn.rotation",
    ):
        assert FORBIDDEN_NAME.search(bad), bad
    for good in ("model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight"):
        assert not FORBIDDEN_NAME.search(good), good


# --- end to end on the tiny model ----------------------------------------------------------------------------


def test_fp32_bake_reloads_as_stock_phi3_and_matches(baked_fp32, trained_dir, tiny_model_dir):
    m = json.loads((baked_fp32 / "manifest.json").read_text())
    v = m["metrics"]["verification"]
    assert v["prompts"] >= 8 and v["passed"]
    assert v["baked_vs_gated"]["max_abs_logit_diff"] <= 1e-4
    assert v["baked_vs_gated"]["top1_agreement"] == 1.0
    # the rotation mattered: the un-rotated merge is orders of magnitude further away
    assert v["unrotated_vs_gated"]["max_abs_logit_diff"] >= 1000 * max(v["baked_vs_gated"]["max_abs_logit_diff"], 1e-7)
    assert v["unrotated_vs_gated"]["kl_mean"] > 1e-3
    assert v["dtype_noise_vs_gated"] is None

    # an independent check: stock reload vs base + PEFT adapter + the trainer's gates, on a prompt of our own
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

    from services.trainer.gates import attach_gates

    gates, _ = so8.load_gates(trained_dir / GATES)
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), trained_dir
    ).eval()
    attach_gates(ref, gates, None, 0.0)
    got = AutoModelForCausalLM.from_pretrained(baked_fp32).eval()
    assert type(got) is Phi3ForCausalLM and got.dtype == torch.float32
    ids = AutoTokenizer.from_pretrained(baked_fp32)(
        "<|user|>\n東京について教えて。<|end|>\n<|assistant|>\n", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - got(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4


def test_bake_output_is_plain_phi3_with_complete_tokenizer(baked_fp32, trained_dir, tiny_model_dir):
    cfg = json.loads((baked_fp32 / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["model_type"] == "phi3" and cfg["dtype"] == "float32"
    assert "auto_map" not in cfg and not any("so8" in k.lower() for k in cfg)
    assert cfg["hidden_size"] == 256 and cfg["rope_parameters"]["rope_type"] == "longrope"
    assert json.loads((baked_fp32 / "generation_config.json").read_text())["eos_token_id"] == [32007, 32001, 32000]
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        assert (baked_fp32 / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert "<|assistant|>" in json.loads((baked_fp32 / "tokenizer_config.json").read_text())["chat_template"]

    from safetensors import safe_open

    names = []
    for f in baked_fp32.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names += list(st.keys())
            assert all(st.get_slice(k).get_dtype() == "F32" for k in st.keys())
    assert not [n for n in names if FORBIDDEN_NAME.search(n)]
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as st:
        assert sorted(names) == sorted(st.keys())

    m = json.loads((baked_fp32 / "manifest.json").read_text())
    assert m["stage"] == "bake"
    assert m["inputs"]["trained"]["sha256"] == manifest.sha256_tree(trained_dir)
    assert m["inputs"]["base"]["sha256"] == manifest.sha256_tree(tiny_model_dir)
    stats = m["metrics"]["rotation_stats"]
    assert sorted(stats) == ["0", "1"]
    for s in stats.values():
        assert s["angle_norm_mean"] > 1.0 and s["max_abs_RtR_minus_I"] < 1e-5 and abs(s["det_min"] - 1) < 1e-5
    assert m["metrics"]["weights"]["lora_merged"] == 8 and m["metrics"]["weights"]["rotations_folded"] == 2


def test_unchanged_inputs_are_skipped(baked_fp32, trained_dir, tmp_path):
    out = copy(baked_fp32, tmp_path / "baked")
    before = manifest.sha256_tree(out, exclude=())
    assert bake(trained_dir, out, BakeOptions(dtype="float32")).skipped
    assert manifest.sha256_tree(out, exclude=()) == before


def test_cli_bf16_sharded(trained_dir, tmp_path, capsys):
    """`so8t bake` in bfloat16 with small shards: reloads, the bound follows the measured bf16 rounding noise."""
    from safetensors import safe_open

    from services.cli import main

    out = tmp_path / "baked"
    rc = main(["bake", "--trained", str(trained_dir), "--output", str(out), "--max-shard-gb", "0.02"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "baked vs trained" in printed and "bfloat16 rounding alone" in printed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and all((out / s).is_file() for s in shards)
    with safe_open(str(out / shards[0]), framework="pt") as st:
        assert st.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    v = json.loads((out / "manifest.json").read_text())["metrics"]["verification"]
    noise = v["dtype_noise_vs_gated"]
    assert 0 < noise["max_abs_logit_diff"] < 0.1
    assert v["baked_vs_gated"]["max_abs_logit_diff"] <= v["bounds"]["max_abs_logit_diff"]
    assert v["baked_vs_gated"]["max_abs_logit_diff"] <= 2 * noise["max_abs_logit_diff"]  # same order as rounding
    assert v["unrotated_vs_gated"]["max_abs_logit_diff"] > 20 * v["bounds"]["max_abs_logit_diff"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_wrong_fold_is_caught_in_bf16_and_previous_bake_kept(baked_fp32, trained_dir, tmp_path):
    """Rᵀ instead of R: far outside even the rounding-calibrated bfloat16 bound."""
    out = copy(baked_fp32, tmp_path / "baked")
    before = manifest.sha256_tree(out, exclude=())
    with pytest.raises(VerificationFailed) as err:
        bake(trained_dir, out, BakeOptions(dtype="bfloat16"), force=True, fold=transposed_fold)
    r = err.value.report
    assert not r["passed"]
    assert r["baked_vs_gated"]["max_abs_logit_diff"] > 50 * r["bounds"]["max_abs_logit_diff"]
    assert manifest.sha256_tree(out, exclude=()) == before
    assert leftovers(tmp_path) == []


def test_cli_wrong_fold_exits_non_zero_and_previous_bake_kept(baked_fp32, trained_dir, tmp_path, monkeypatch, capsys):
    from services.baker import weights
    from services.cli import main

    right = weights.bake_tensor
    monkeypatch.setattr(weights, "bake_tensor", lambda W, lora, R, fold=None: right(W, lora, R, transposed_fold))
    out = copy(baked_fp32, tmp_path / "baked")
    before = manifest.sha256_tree(out, exclude=())
    rc = main(["bake", "--trained", str(trained_dir), "--output", str(out), "--dtype", "float32", "--force"])
    err = capsys.readouterr().err
    assert rc == 1 and "verification FAILED" in err and "max_abs_logit_diff" in err
    assert manifest.sha256_tree(out, exclude=()) == before and leftovers(tmp_path) == []


# --- bad inputs: a clear error naming the file, nothing written ----------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _llama_adapter(out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out)


CASES = {
    # name: (breaks the trained copy / base copy, file the message must name)
    "missing gates": (lambda t, b: (t / GATES).unlink(), lambda t, b: t / GATES),
    "missing trained manifest": (lambda t, b: (t / "manifest.json").unlink(), lambda t, b: t / "manifest.json"),
    "missing tokenizer": (lambda t, b: (b / "tokenizer.model").unlink(), lambda t, b: b / "tokenizer.model"),
    "no chat template": (
        lambda t, b: _edit_json(b / "tokenizer_config.json", chat_template=None),
        lambda t, b: b / "tokenizer_config.json",
    ),
    "base with other hidden size": (
        lambda t, b: _edit_json(b / "config.json", hidden_size=512),
        lambda t, b: t / GATES,
    ),
    "base with fewer layers": (lambda t, b: _edit_json(b / "config.json", num_hidden_layers=1), lambda t, b: t / GATES),
    "base not phi3": (lambda t, b: _edit_json(b / "config.json", model_type="llama"), lambda t, b: b / "config.json"),
    "adapter for llama": (lambda t, b: _llama_adapter(t), lambda t, b: t / "adapter_config.json"),
    "truncated adapter": (
        lambda t, b: (t / "adapter_model.safetensors").write_bytes(b"\x10\x00"),
        lambda t, b: t / "adapter_model.safetensors",
    ),
    "gates not a gates file": (lambda t, b: (t / GATES).write_bytes(b"junk"), lambda t, b: t / GATES),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_file_and_writes_nothing(case, trained_dir, tiny_model_dir, tmp_path, capsys):
    from services.cli import main

    t, b = copy(trained_dir, tmp_path / "final"), copy(tiny_model_dir, tmp_path / "base")
    breaker, culprit = CASES[case]
    breaker(t, b)
    out = tmp_path / "runs" / "baked"
    rc = main(["bake", "--trained", str(t), "--output", str(out), "--base", str(b), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(culprit(t, b)) in err, err
    assert not (tmp_path / "runs").exists()


def test_changed_base_is_refused_unless_named(trained_dir, tiny_model_dir, tmp_path):
    t = copy(trained_dir, tmp_path / "final")
    b = copy(tiny_model_dir, tmp_path / "base")
    _edit_json(t / "manifest.json", base_model=str(b))
    (b / "added_tokens.json").write_text((b / "added_tokens.json").read_text() + " ")  # content differs now
    with pytest.raises(BakeInputError, match="differs from the one the adapter was trained on"):
        bake(t, tmp_path / "out", BakeOptions(dtype="float32"))
    assert not (tmp_path / "out").exists()


def test_nan_in_base_is_an_error(trained_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    b = copy(tiny_model_dir, tmp_path / "base")
    sd = load_file(b / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.down_proj.weight") as err:
        bake(trained_dir, tmp_path / "out", BakeOptions(dtype="float32"), base=str(b))
    assert str(b / "model.safetensors") in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_fp16_overflow_is_an_error(trained_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    t = copy(trained_dir, tmp_path / "final")
    sd = load_file(t / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"] *= 1e9
    save_file(sd, t / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match="gate_up_proj.*float16"):
        bake(t, tmp_path / "out", BakeOptions(dtype="float16"))
    assert not (tmp_path / "out").exists()


# --- realism and entry points --------------------------------------------------------------------------------


def test_real_phi35_tokenizer_is_carried_over(real_tokenizer_dir, trained_dir, tiny_model_dir, tmp_path):
    """The tiny weights with the real Phi-3.5 tokenizer (same 32064 vocabulary): copied verbatim, prompts verify."""
    b = copy(tiny_model_dir, tmp_path / "base")
    for name in (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        shutil.copyfile(real_tokenizer_dir / name, b / name)
    out = tmp_path / "baked"
    m = bake(trained_dir, out, BakeOptions(dtype="float32"), base=str(b)).manifest
    assert m["metrics"]["verification"]["baked_vs_gated"]["max_abs_logit_diff"] <= 1e-4
    assert (out / "tokenizer_config.json").read_bytes() == (real_tokenizer_dir / "tokenizer_config.json").read_bytes()


def test_entry_points_help():
    so8t = Path(sys.executable).parent / "so8t"  # the console script next to this interpreter, venv on PATH or not
    for argv in ([str(so8t), "bake", "--help"], [sys.executable, "-m", "services.baker", "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
        assert "--trained" in out and "--dtype" in out and "--base" in out


def test_too_little_host_ram_for_the_verification_fails_at_once_naming_the_need(trained_dir, tmp_path, monkeypatch):
    """A 16 GB desktop cannot hold Phi-3.5-mini in float32 beside everything else: the bake says so before the
    merge (no OOM kill for the restart policy to repeat), and the previous bake stays."""
    from services.baker import verify
    from shared.errors import InputError

    monkeypatch.delenv(verify.DEVICE_ENV, raising=False)
    monkeypatch.setattr(verify, "available_ram", lambda: 200 << 20)
    out = tmp_path / "baked"
    out.mkdir()
    (out / "previous.txt").write_text("the previous bake")
    with pytest.raises(InputError, match=r"needs 1\.\d GiB of host RAM .* may use 0\.2 GiB") as err:
        bake(trained_dir, out, BakeOptions(dtype="float32"))
    assert "raise the container's memory limit" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["previous.txt"] and not leftovers(tmp_path)


def test_available_ram_reads_meminfo_and_a_cgroup_limit():
    from services.baker.verify import available_ram

    meminfo = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:")).split()[1]) * 1024
    assert 0 < available_ram() <= meminfo
