"""A tiny Phi-3 with random weights and a Phi-3-shaped SentencePiece tokenizer, built offline in seconds.

Used by the tests of every stage, the demo and the benchmarks. The tokenizer has 32000 SentencePiece pieces
(a small trained BPE with byte fallback, padded with unused pieces) and Phi-3's special tokens at their real
ids (<|endoftext|> 32000, <|assistant|> 32001, <|system|> 32006, <|end|> 32007, <|user|> 32010), so
llama.cpp's converter treats it exactly like the real one. The model keeps longrope and a hidden size that is
a multiple of 256 (K-quants need whole 256-wide blocks).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import atomic
from shared.think_format import PHI35_CHAT_TEMPLATE

SP_PIECES = 32000
VOCAB_SIZE = 32064
SPECIAL_TOKENS = {
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|placeholder1|>": 32002,
    "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004,
    "<|placeholder4|>": 32005,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|placeholder5|>": 32008,
    "<|placeholder6|>": 32009,
    "<|user|>": 32010,
}

_CORPUS = [
    "# 思考ステップ",
    "# 最終回答",
    "判定: ALLOW",
    "判定: ESCALATION",
    "判定: DENY",
    "判定: REFUSE",
    "Verdict: ALLOW",
    "Verdict: ESCALATION",
    "Verdict: DENY",
    "Verdict: REFUSE",
    "<think-task>",
    "</think-task>",
    "<think-safety>",
    "</think-safety>",
    "<think-policy>",
    "</think-policy>",
    "<final>",
    "</final>",
    "依頼の内容を確認します。ユーザーは情報を求めています。",
    "安全性を評価します。危険な要素は見当たりません。",
    "適用される方針: 一般的な情報提供は許可されます。",
    "専門家への引き継ぎが必要です。医療や法律の判断は人間が行います。",
    "この依頼には応じられません。代わりに安全な方法をご案内します。",
    "申し訳ありませんが、お手伝いできません。",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "2+2は4です。計算の答えは4です。",
    "The user asks for information. The request is safe.",
    "Applicable policy: general information is allowed.",
    "This needs a human expert: medical and legal decisions are made by people.",
    "I cannot help with that request. Here is a safer alternative.",
    "I'm sorry, but I can't help with that.",
    "What is 2+2? The answer is 4.",
    "The capital of Japan is Tokyo.",
    "Explain how photosynthesis works.",
    "質問: 光合成の仕組みを説明してください。",
    "回答: 植物は光のエネルギーを使って二酸化炭素と水から糖を作ります。",
]


def _train_sentencepiece(vocab: int = 1000, text: Sequence[str] = ()) -> bytes:
    """BPE on the built-in corpus (x20) and `text` (x5, e.g. the lines of a dataset), padded to 32000 pieces."""
    import sentencepiece as spm
    import sentencepiece.sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20 + list(text) * 5),
        model_writer=buf,
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    proto.ParseFromString(buf.getvalue())
    for i in range(len(proto.pieces), SP_PIECES):  # pad to Phi-3's 32000 pieces so special ids line up
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", -1e9, pb.ModelProto.SentencePiece.UNUSED  # type: ignore[attr-defined]
    return proto.SerializeToString()


def build_tokenizer(out: str | Path, vocab: int = 1000, text: Sequence[str] = ()):
    """Write a complete Phi-3-style tokenizer to `out` and return it loaded (`vocab` real pieces, learnt from the
    built-in corpus and `text`)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / "tokenizer.model", _train_sentencepiece(vocab, text))
    atomic.write_json(out / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": False})
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    got = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if got != SPECIAL_TOKENS:
        raise RuntimeError(f"special token ids came out as {got}")
    tok.save_pretrained(out)  # writes tokenizer.json (the fast tokenizer, added tokens included)
    _phi35_normalizer(out / "tokenizer.json")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    # tokenizer_config.json in the shape Phi-3.5-mini-instruct ships (older loaders and llama.cpp read it)
    atomic.write_json(out / "tokenizer_config.json", _phi35_tokenizer_config())
    atomic.write_json(out / "added_tokens.json", SPECIAL_TOKENS)
    atomic.write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    )
    return AutoTokenizer.from_pretrained(out)


def _phi35_normalizer(path: Path) -> None:
    """Phi-3.5's own tokenizer.json normalises every text piece between special tokens with Prepend("▁") + Replace
    (" " -> "▁") and has no pre-tokenizer, like llama.cpp's SentencePiece tokeniser; the conversion from the
    SentencePiece model gives a Metaspace pre-tokenizer that prepends "▁" to the first piece only, so the ids after
    a special token differed."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    spec["pre_tokenizer"] = None
    atomic.write_text(path, json.dumps(spec, ensure_ascii=False, indent=2))


def _phi35_tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": t != "<|endoftext|>",
                "single_word": False,
                "special": True,
            }
            for t, i in SPECIAL_TOKENS.items()
        },
        "bos_token": "<s>",
        "chat_template": PHI35_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def tiny_config(hidden: int = 256, layers: int = 2, heads: int = 4, intermediate: int = 512):
    """A Phi3Config scaled down; longrope kept with one factor per rotary frequency."""
    from transformers import Phi3Config

    half = hidden // heads // 2
    short = [round(1.0 + 1.8 * (i / (half - 1)) ** 2, 4) for i in range(half)]
    long = [round(1.0 + 63.0 * (1 - math.cos(math.pi * i / (half - 1))) / 2, 4) for i in range(half)]
    return Phi3Config(  # type: ignore[call-arg]  # rope_* are config attributes transformers' stubs omit
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        tie_word_embeddings=False,
        sliding_window=None,
        attention_dropout=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


def write_tiny_model(out: Path, seed: int = 0, vocab: int = 1000, text: Sequence[str] = (), **sizes) -> None:
    """Write a random-weight tiny Phi3ForCausalLM plus tokenizer into the directory `out`."""
    import torch
    from transformers import GenerationConfig, Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(tiny_config(**sizes)).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=[32007, 32001, 32000], pad_token_id=32000).save_pretrained(out)
    build_tokenizer(out, vocab, text)


def build_tiny_model(out: str | Path, seed: int = 0, **sizes) -> Path:
    """Save a random-weight tiny Phi3ForCausalLM plus tokenizer to `out` (replaced atomically)."""
    out = Path(out)
    with atomic.staging_dir(out) as tmp:
        write_tiny_model(tmp, seed, **sizes)
    return out


def teach(
    src: str | Path,
    dst: str | Path,
    ids: list[int],
    start: int = 1,
    steps: int = 30,
    lr: float = 3e-3,
    stop_loss: float = 0.0,
) -> Path:
    """Save to `dst` the tiny model at `src` trained to continue ids[:start] with ids[start:] (greedily).

    For tests and benches that need a model with clear first choices, or one that writes a known reply: AdamW on
    that one sequence, over the decoder layers and the output rows of the tokens in `ids` (embeddings and every other
    row frozen), `steps` steps or until the loss is below `stop_loss`; a few seconds on 2 cores. The tokenizer and
    generation config are copied from `src`.
    """
    import shutil

    import torch
    from transformers import Phi3ForCausalLM

    src, dst = Path(src), Path(dst)
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    used = sorted(set(ids))  # a softmax over the rows of these tokens only
    head = torch.nn.Parameter(model.lm_head.weight[used].clone())
    target = torch.tensor([used.index(t) for t in ids[start:]])
    inputs = torch.tensor([ids[:-1]])
    params = [p for p in model.model.parameters() if p.requires_grad] + [head]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # 5e-3 oscillates; 3e-3 converges
    model.train()
    for _ in range(steps):
        hidden = model.model(input_ids=inputs).last_hidden_state[0, start - 1 :]
        loss = torch.nn.functional.cross_entropy(hidden @ head.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_loss:
            break
    with torch.no_grad():
        model.lm_head.weight[used] = head
    model.eval().save_pretrained(dst)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    return dst
