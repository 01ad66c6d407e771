"""GGUF header checks with llama.cpp's own reader (gguf.GGUFReader), against the HF model's config.

Architecture `phi3`, block count, context length, widths, rope base, RMS-norm epsilon, longrope (original
context, attention factor and the long/short factor tensors, value for value), chat template (the HF one,
verbatim), vocabulary size, the file type of the quantisation, a general.name that makes llama.cpp strip after
special tokens as HF does, and exactly the tensors a stock Phi-3 has: no SO(8) gate, no LoRA leftover, nothing
unknown.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import Keys

from services.converter.hf_to_gguf import PHI3_NAME_MARKERS
from shared.layout import GGUF_FILE_TYPES
from shared.phi3 import NON_STOCK_TENSOR

ARCH = "phi3"
_BLOCK = ("attn_norm", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
_QKV_SPLIT = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class Expected:
    """What the GGUF must say, taken from the HF model directory."""

    block_count: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    longrope: dict[str, Any] | None  # {"original_context_length", "attn_factor", "long_factor", "short_factor"}
    chat_template: str | None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Expected:
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        longrope = None
        if (rope.get("type") or rope.get("rope_type")) == "longrope":
            orig = rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
            scale = cfg["max_position_embeddings"] / orig
            attn = rope.get("attention_factor") or (
                1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig))
            )
            longrope = {
                "original_context_length": orig,
                "attn_factor": attn,
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
            }
        return cls(
            block_count=cfg["num_hidden_layers"],
            context_length=cfg["max_position_embeddings"],
            embedding_length=cfg["hidden_size"],
            feed_forward_length=cfg["intermediate_size"],
            head_count=cfg["num_attention_heads"],
            head_count_kv=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            longrope=longrope,
            chat_template=hf_chat_template(model_dir),
        )


def hf_chat_template(model_dir: Path) -> str | None:
    """The HF tokenizer's chat template when it is one string (tokenizer_config.json or chat_template.jinja)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        tmpl = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except FileNotFoundError:
        return None
    return tmpl if isinstance(tmpl, str) else None


@dataclass
class Header:
    """The parts of a GGUF header the checks read."""

    fields: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (type name, shape)
    rope_factors: dict[str, list[float]] = field(default_factory=dict)  # "long"/"short" -> values
    n_tokens: int = 0

    def get(self, key: str) -> Any:
        return self.fields.get(key.format(arch=ARCH))


def read_header(path: str | Path) -> Header:
    reader = gguf.GGUFReader(str(path))
    fields: dict[str, Any] = {}
    n_tokens = 0
    for key, f in reader.fields.items():
        if key == Keys.Tokenizer.LIST:
            n_tokens = len(f.data)
        elif not key.startswith("tokenizer.ggml.") or len(f.data) <= 1:  # skip the big vocabulary arrays
            fields[key] = f.contents()
    tensors, factors = {}, {}
    for t in reader.tensors:
        tensors[t.name] = (t.tensor_type.name, tuple(int(x) for x in t.shape))
        for kind in ("long", "short"):
            if t.name == f"rope_factors_{kind}.weight":
                factors[kind] = [float(x) for x in t.data]
    return Header(fields, tensors, factors, n_tokens)


def expected_tensors(exp: Expected) -> tuple[set[str], list[str]]:
    """(allowed, required) tensor names of a Phi-3 this shape; attention is fused qkv (as Phi-3 ships) or split."""
    names = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]]
    allowed = {n.format(bid=b) + ".weight" for n in names for b in range(exp.block_count)}
    required = ["token_embd.weight", "output_norm.weight"]
    if not exp.tied_embeddings:
        required.append("output.weight")
    if exp.longrope:
        required += ["rope_factors_long.weight", "rope_factors_short.weight"]
    required += [f"blk.{b}.{n}.weight" for b in range(exp.block_count) for n in _BLOCK]
    return allowed, required


def check_header(h: Header, exp: Expected, qtype: str) -> list[str]:
    """Every way `h` differs from a stock Phi-3 GGUF of type `qtype` shaped like `exp`; empty when it passes."""
    bad: list[str] = []

    def want(key: str, value: Any) -> None:
        got = h.get(key)
        if got != value:
            bad.append(f"{key.format(arch=ARCH)} is {got!r}, expected {value!r}")

    def want_close(key: str, value: float) -> None:  # stored as float32
        got = h.get(key)
        if got is None or not math.isclose(got, value, rel_tol=1e-6):
            bad.append(
                f"{key.format(arch=ARCH)} is {'missing' if got is None else format(got, 'g')}, expected {value:g}"
            )

    if h.fields.get(Keys.General.ARCHITECTURE) != ARCH:
        return [f"{Keys.General.ARCHITECTURE} is {h.fields.get(Keys.General.ARCHITECTURE)!r}, expected {ARCH!r}"]
    want(Keys.LLM.BLOCK_COUNT, exp.block_count)
    want(Keys.LLM.CONTEXT_LENGTH, exp.context_length)
    want(Keys.LLM.EMBEDDING_LENGTH, exp.embedding_length)
    want(Keys.LLM.FEED_FORWARD_LENGTH, exp.feed_forward_length)
    want(Keys.Attention.HEAD_COUNT, exp.head_count)
    want(Keys.Attention.HEAD_COUNT_KV, exp.head_count_kv)
    want_close(Keys.Rope.FREQ_BASE, exp.rope_theta)
    want_close(Keys.Attention.LAYERNORM_RMS_EPS, exp.rms_norm_eps)
    want(Keys.General.FILE_TYPE, int(gguf.LlamaFileType[GGUF_FILE_TYPES[qtype]]))  # type: ignore[index]
    name = str(h.fields.get(Keys.General.NAME, ""))
    if not any(m in name.lower() for m in PHI3_NAME_MARKERS):
        bad.append(f"{Keys.General.NAME} {name!r} lacks 'phi-3'/'phi3': llama.cpp would not strip after special tokens")
    if h.n_tokens != exp.vocab_size:
        bad.append(f"{Keys.Tokenizer.LIST} has {h.n_tokens} entries, expected the model's vocab_size {exp.vocab_size}")
    tmpl = h.fields.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if not tmpl:
        bad.append(f"{Keys.Tokenizer.CHAT_TEMPLATE} missing")
    elif exp.chat_template is not None and tmpl != exp.chat_template:
        bad.append(f"{Keys.Tokenizer.CHAT_TEMPLATE} differs from the HF tokenizer's chat template")
    if exp.longrope:
        lr = exp.longrope
        want(Keys.Rope.SCALING_ORIG_CTX_LEN, lr["original_context_length"])
        attn = h.get(Keys.Rope.SCALING_ATTN_FACTOR)
        if attn is None or abs(attn - lr["attn_factor"]) > 1e-5:
            bad.append(
                f"{Keys.Rope.SCALING_ATTN_FACTOR.format(arch=ARCH)} is {attn!r}, expected {lr['attn_factor']:.6f}"
            )
        for kind in ("long", "short"):
            got, ref = h.rope_factors.get(kind), lr[f"{kind}_factor"]
            if got is not None and (
                len(got) != len(ref) or any(abs(a - b) > 1e-6 * max(1, abs(b)) for a, b in zip(got, ref))
            ):
                bad.append(f"rope_factors_{kind}.weight differs from the config's {kind}_factor")
    allowed, required = expected_tensors(exp)
    for tname in sorted(h.tensors):
        if NON_STOCK_TENSOR.search(tname):
            bad.append(f"tensor {tname}: an SO(8) gate or LoRA leftover has no place in a stock Phi-3")
        elif tname not in allowed:
            bad.append(f"tensor {tname}: not a Phi-3 tensor")
    bad += [f"tensor {req} missing" for req in required if req not in h.tensors]
    for b in range(exp.block_count):
        split = [f"blk.{b}.{n}.weight" for n in _QKV_SPLIT]
        if f"blk.{b}.attn_qkv.weight" not in h.tensors and not all(n in h.tensors for n in split):
            bad.append(f"tensor blk.{b}.attn_qkv.weight (or split q/k/v) missing")
    return bad


def summary(h: Header) -> dict[str, Any]:
    """The header facts the manifest records."""
    return {
        "architecture": h.fields.get(Keys.General.ARCHITECTURE),
        "name": h.fields.get(Keys.General.NAME),
        "file_type": h.fields.get(Keys.General.FILE_TYPE),
        "block_count": h.get(Keys.LLM.BLOCK_COUNT),
        "context_length": h.get(Keys.LLM.CONTEXT_LENGTH),
        "rope_original_context_length": h.get(Keys.Rope.SCALING_ORIG_CTX_LEN),
        "rope_attn_factor": h.get(Keys.Rope.SCALING_ATTN_FACTOR),
        "rope_factor_tensors": sorted(h.rope_factors),
        "chat_template": bool(h.fields.get(Keys.Tokenizer.CHAT_TEMPLATE)),
        "vocab": h.n_tokens,
        "tensors": len(h.tensors),
        "tensor_types": dict(sorted(collections.Counter(t for t, _ in h.tensors.values()).items())),
    }
