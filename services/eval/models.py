"""The models an evaluation asks, and one greedy generator per kind.

A model spec is `NAME=KIND:WHERE` (`base=hf:/data/models/tiny`, `Q4_K_M=gguf:/data/runs/x/gguf/m-Q4_K_M.gguf`,
`served=ollama:so8t:q4_k_m`); without `KIND:` a directory is `hf` and a `.gguf` file is `gguf`, and without `NAME=`
the name is the file's stem. Every generator decodes greedily from the Phi-3.5 chat rendering of the record's system
and user turns and stops at a chat-template stop token.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from shared.errors import InputError
from shared.think_format import STOP_TOKENS

Kind = Literal["hf", "gguf", "ollama"]
KINDS: tuple[Kind, ...] = ("hf", "gguf", "ollama")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the report's label (and transcripts-<name>.jsonl)
    kind: Kind
    where: str  # directory or hub id, GGUF file, Ollama tag

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = "", text
        kind, sep, where = rest.partition(":")
        if not sep or kind not in KINDS:
            kind, where = ("gguf" if rest.endswith(".gguf") else "hf"), rest
            if not Path(where).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", where):
                raise InputError(
                    f"--model {text!r}: {where} is not a directory, a .gguf file or a hub id; "
                    f"write NAME=KIND:WHERE with KIND one of {', '.join(KINDS)}"
                )
        name = name or Path(where).stem or where
        if not _NAME.fullmatch(name):
            raise InputError(f"--model {text!r}: the name {name!r} may use letters, digits, '.', '_' and '-'")
        if kind == "gguf" and not Path(where).is_file():
            raise InputError(f"--model {text!r}: {where}: GGUF file not found")
        return cls(name, kind, where)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.name}={self.kind}:{self.where}"


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int
    seconds: float


class Generator(Protocol):
    def generate(self, prompt: str, max_tokens: int) -> Reply: ...

    def logprobs(self, texts: list[str]) -> list[float] | None:
        """Teacher-forced log-probability of each text's tokens after the texts' longest common token prefix
        (None where the model gives no probabilities: Ollama)."""
        ...

    def close(self) -> None: ...


class HFGenerator:
    """A Hugging Face directory or hub id through transformers: bfloat16 on the GPU when there is one, else float32
    on the CPU (without CUDA the eval normally asks the model as a GGUF instead: `as_gguf`)."""

    def __init__(self, where: str, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(where)
        placement = {"device_map": {"": self.device}} if self.device.type == "cuda" else {}
        self.model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placement).eval()
        self.stops = [i for i in (self.tok.convert_tokens_to_ids(t) for t in STOP_TOKENS) if isinstance(i, int)]

    def generate(self, prompt: str, max_tokens: int) -> Reply:
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        t0 = time.time()
        with self.torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=self.torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=self.stops,
                pad_token_id=self.stops[-1],
            )
        new = out[0, ids.shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in self.stops), len(new))]
        return Reply(str(self.tok.decode(new)), len(new), time.time() - t0)

    def logprobs(self, texts: list[str]) -> list[float] | None:
        seqs = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        c = common_prefix(seqs)
        out = []
        with self.torch.inference_mode():
            for seq in seqs:
                ids = self.torch.tensor([seq], device=self.device)
                logits = self.model(ids).logits[0, c - 1 : len(seq) - 1].float()
                lp = self.torch.log_softmax(logits, dim=-1)
                out.append(float(lp.gather(1, ids[0, c:, None]).sum()))
        return out

    def close(self) -> None:
        del self.model


class GGUFGenerator:
    """A GGUF file through llama.cpp (the pinned llama-cpp-python), greedy."""

    def __init__(self, path: str, n_ctx: int, threads: int | None = None):
        from services.converter import llama

        self.llama = llama
        self.llm = llama.open_model(path, n_ctx=n_ctx, threads=threads)  # greedy() reads the last position's logits
        self.stops = [self.llm.tokenize(t.encode(), add_bos=False, special=True)[0] for t in STOP_TOKENS]

    def generate(self, prompt: str, max_tokens: int) -> Reply:
        ids = self.llama.tokenize(self.llm, prompt)
        t0 = time.time()
        new = self.llama.greedy(self.llm, ids, min(max_tokens, self.llm.n_ctx() - len(ids)), self.stops)
        return Reply(self.llama.detokenize(self.llm, new), len(new), time.time() - t0)

    def logprobs(self, texts: list[str]) -> list[float] | None:
        """The common prefix evaluated once; each text's tail after it from there (the cache rewound between)."""
        import numpy as np

        seqs = [self.llama.tokenize(self.llm, t) for t in texts]
        c = common_prefix(seqs)
        if max(map(len, seqs)) > self.llm.n_ctx():
            return None
        self.llm.reset()
        self.llm.eval(seqs[0][:c])
        out = []
        for seq in seqs:
            self.llm.n_tokens = c  # the next eval drops the cache past the prefix
            if len(seq) - c > 1:
                self.llm.eval(seq[c:-1])
            rows = np.asarray(self.llm.scores[c - 1 : len(seq) - 1], dtype=np.float64)
            lp = rows - rows.max(axis=1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
            out.append(float(lp[np.arange(len(seq) - c), seq[c:]].sum()))
        return out

    def close(self) -> None:
        self.llm.close()


class OllamaGenerator:
    """A model on an Ollama server ($OLLAMA_HOST), the raw prompt at temperature 0 with a fixed seed."""

    def __init__(self, tag: str, seed: int, timeout: float = 600.0):
        from services.ollama import importer

        self.client, self.tag, self.seed = importer.client(timeout=timeout), tag, seed
        self.client.show(tag)  # fails here, naming the tag, when the server does not have it

    def generate(self, prompt: str, max_tokens: int) -> Reply:
        t0 = time.time()
        r = self.client.generate(
            model=self.tag,
            prompt=prompt,
            raw=True,
            stream=False,
            options={"temperature": 0, "seed": self.seed, "num_predict": max_tokens, "stop": list(STOP_TOKENS)},
        )
        return Reply(r.response or "", int(r.eval_count or 0), time.time() - t0)

    def logprobs(self, texts: list[str]) -> list[float] | None:
        return None

    def close(self) -> None:
        pass


def common_prefix(seqs: list[list[int]]) -> int:
    """The length of the longest common prefix of `seqs`; every sequence must go on past it (texts that differ
    in their last characters do) and the prefix must not be empty."""
    c = 0
    while all(len(s) > c for s in seqs) and len({s[c] for s in seqs}) == 1:
        c += 1
    if c == 0 or any(len(s) == c for s in seqs):
        raise ValueError("texts to score need a common, non-empty token prefix and a tail each")
    return c


def gguf_cache() -> Path:
    """Where HF models converted for the eval are kept: beside the HF cache when there is one (/data in the stack)."""
    import os

    hf_home = os.environ.get("HF_HOME")
    return Path(hf_home) / "so8t-gguf" if hf_home else Path.home() / ".cache" / "so8t" / "gguf"


def as_gguf(where: str, cache: Path | None = None) -> Path:
    """The F16 GGUF of the Hugging Face model `where` (directory or hub id), converted once by llama.cpp's converter
    and cached under its content hash; a rerun, or another run on the same base, reuses it."""
    from services.converter.hf_to_gguf import convert_f16
    from shared import atomic, logs, manifest

    model_dir = Path(where)
    if not model_dir.is_dir():
        from huggingface_hub import snapshot_download

        model_dir = Path(snapshot_download(where))
    cache = cache or gguf_cache()
    target = cache / f"{manifest.sha256_tree(model_dir)[:16]}-F16.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    logs.get("eval").info("%s: no CUDA device, converting it to GGUF F16 once (%s)", where, target)
    tmp = atomic.temp_file(target)
    try:
        convert_f16(model_dir, tmp, model_dir.name)
        atomic.fsync_path(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def open_generator(
    spec: ModelSpec, n_ctx: int, seed: int, threads: int | None, hf_without_cuda: str = "transformers"
) -> Generator:
    if spec.kind == "hf":
        import torch

        if torch.cuda.is_available() or hf_without_cuda == "transformers":
            return HFGenerator(spec.where, threads)
        return GGUFGenerator(str(as_gguf(spec.where)), n_ctx, threads)
    if spec.kind == "gguf":
        return GGUFGenerator(spec.where, n_ctx, threads)
    return OllamaGenerator(spec.where, seed)
