"""The HF side of the checks: the baked model in float32 on a fixed chat-templated /think conversation.

The reference logits are computed once, before any GGUF is loaded, and the model is freed right after, so the
HF model and a GGUF never sit in memory together.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.think_format import STOP_TOKENS, Thinking, render_assistant, render_chat

SYSTEM = "あなたは慎重なアシスタントです。考えてから答えてください。"
USER = "2+2はいくつですか？ Answer briefly."
ANSWER = render_assistant(
    Thinking("依頼の内容を確認します。ユーザーは計算の答えを求めています。安全性に問題はありません。\n判定: ALLOW"),
    "2+2は4です。The answer is 4.",
    "simple",
)
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]


def check_text() -> str:
    """The whole conversation (system, user, assistant answer) in the Phi-3.5 template: logits are compared here."""
    return render_chat(MESSAGES)


def prompt_text() -> str:
    """The conversation up to `<|assistant|>\\n`: the greedy smoke generation continues from here."""
    return render_chat(MESSAGES[:-1], add_generation_prompt=True)


def prompt_digest() -> str:
    return hashlib.sha256(check_text().encode()).hexdigest()[:16]


@dataclass
class Reference:
    model_dir: Path
    layers: int  # the model's decoder layers (the logit bounds grow with depth)
    text_ids: list[int]
    logits: np.ndarray  # float32 [len(text_ids), vocab]
    prompt_ids: list[int]
    greedy_ids: list[int]
    stop_ids: list[int]
    greedy_text: str
    seconds: float


def hf_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_model(model_dir: str | Path):
    """The HF model in float32, for inference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy().copy()


def compute(model_dir: str | Path, max_new: int, threads: int | None = None) -> Reference:
    """Load the HF model in float32, take logits on check_text() and a greedy continuation of prompt_text()."""
    import torch
    from transformers import AutoTokenizer

    t0 = time.time()
    with torch_threads(threads):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = load_model(model_dir)
        text_ids, prompt_ids = hf_ids(tok, check_text()), hf_ids(tok, prompt_text())
        stop_ids = [i for i in (tok.convert_tokens_to_ids(t) for t in STOP_TOKENS) if isinstance(i, int) and i >= 0]
        ref_logits = logits(model, text_ids)
        with torch.inference_mode():
            seq = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=stop_ids[-1] if stop_ids else None,
            )[0, len(prompt_ids) :].tolist()
        greedy = [t for t in seq[: next((i for i, t in enumerate(seq) if t in stop_ids), len(seq))]]
        text = str(tok.decode(greedy))
        layers = int(model.config.num_hidden_layers)
        del model
        gc.collect()
    return Reference(
        Path(model_dir), layers, text_ids, ref_logits, prompt_ids, greedy, stop_ids, text, time.time() - t0
    )
