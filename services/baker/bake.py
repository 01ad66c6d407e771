"""The bake: trained artifact (base + LoRA + SO(8) gates) -> stock Phi3ForCausalLM directory, proven by reloading.

Steps: validate every input (nothing is written on a bad one) -> stream the merged and folded weights into a
staging directory beside the output (bounded memory, see weights.py) -> plain Phi-3 config, generation config,
the base's complete tokenizer -> reload and compare logits (verify.py) -> manifest, written last -> the staging
directory replaces the output as a whole. Any failure removes the staging directory; the previous bake stays.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from services.baker import inputs as bake_inputs
from services.baker.inputs import BakeInputError, BakeInputs
from services.baker.options import BakeOptions
from services.baker.verify import PROMPTS, AttachGates, plan_placement, verify
from services.baker.weights import DTYPES, Fold, tensor_names, write_weights
from shared import atomic, logs, manifest, stage
from shared.config import config_hash
from shared.phi3 import NON_STOCK_TENSOR
from shared.so8 import CONVENTION, fold_into_weight, rotation_stats

log = logs.get("bake")
BAKER_VERSION = 1
STAGE = "bake"

__all__ = ["BakeOptions", "bake", "plain_config"]


def _peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / 2**20 if sys.platform == "darwin" else r / 1024, 1)


def plain_config(base_cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The base's config.json as a stock Phi-3 one: no remote code, no SO8T keys, the saved dtype."""
    cfg = {
        k: v
        for k, v in base_cfg.items()
        if k not in ("auto_map", "_name_or_path", "quantization_config") and "so8" not in k.lower()
    }
    cfg["architectures"] = ["Phi3ForCausalLM"]
    cfg["model_type"] = "phi3"
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    return cfg


def copy_tokenizer(base: Path, out: Path) -> list[str]:
    """The base's tokenizer files verbatim; tokenizer_config.json gets the chat template embedded if the base
    keeps it only in chat_template.jinja (older loaders and llama.cpp read it there) and loses any auto_map."""
    copied = []
    for name in bake_inputs.TOKENIZER_FILES + bake_inputs.OPTIONAL_TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not tc.get("chat_template") or "auto_map" in tc:
        tc.pop("auto_map", None)
        if not tc.get("chat_template"):
            tc["chat_template"] = (base / "chat_template.jinja").read_text(encoding="utf-8")
        atomic.write_json(out / "tokenizer_config.json", tc)
    return copied


def generation_config(base: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    path = base / "generation_config.json"
    if path.is_file():
        return bake_inputs.read_json(path, "generation config")
    return {
        "_from_model_config": True,
        **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg},
    }


def check_names(out: Path) -> None:
    bad = [n for n in tensor_names(out) if NON_STOCK_TENSOR.search(n)]
    if bad:
        raise BakeInputError(
            f"{out}: non-stock tensor names in the baked model: {bad[:5]} (does the base carry SO8T or LoRA tensors?)"
        )


def _config_record(opts: BakeOptions, inp: BakeInputs) -> dict[str, Any]:
    return {
        "baker_version": BAKER_VERSION,
        **opts.model_dump(),
        "base_model": inp.base.name,
        "base_overridden": inp.base_overridden,
        "verification_prompts": len(PROMPTS),
        "verification_prompts_sha256": config_hash(PROMPTS),
        "convention": CONVENTION,
    }


def _check_base_hash(inp: BakeInputs, base_sha: str) -> None:
    trained_sha = inp.train_manifest.get("base_model_sha256")
    if not trained_sha or trained_sha == base_sha:
        return
    msg = (
        f"{inp.base.path}: base model content (sha256 {base_sha[:12]}…) differs from the one the adapter was "
        f"trained on ({inp.trained / manifest.MANIFEST}: base_model_sha256 {trained_sha[:12]}…)"
    )
    if not inp.base_overridden:
        raise BakeInputError(msg + "; pass --base explicitly to bake against it anyway")
    log.warning("%s; baking anyway (--base given)", msg)


def bake(
    trained: str | Path,
    output: str | Path,
    opts: BakeOptions = BakeOptions(),
    base: str | None = None,
    force: bool = False,
    fold: Fold = fold_into_weight,
    attach: AttachGates | None = None,
) -> stage.StageResult:
    """Bake `trained` into `output`. `fold` and `attach` are injectable for tests (a wrong fold must be caught)."""
    started = time.time()
    # the trained artifact checked against its manifest before a byte of it is used
    trained_input = stage.verified_input(trained) if Path(trained).is_dir() else None
    inp = bake_inputs.load(trained, base)
    log.info(
        "base %s (%s), %d LoRA pairs (r=%s, alpha=%s), gates on layers %s",
        inp.base.name,
        inp.base.path,
        len(inp.lora),
        inp.lora_config["r"],
        inp.lora_config["alpha"],
        sorted(inp.gates),
    )
    described = {
        "trained": trained_input or stage.verified_input(inp.trained),
        "base": stage.verified_input(inp.base.path),
    }
    _check_base_hash(inp, described["base"]["sha256"])
    spec = stage.Spec(STAGE, Path(output), described, _config_record(opts, inp))
    result = stage.run(spec, lambda tmp: _write(inp, tmp, opts, fold, attach), force, started)
    if not result.skipped:
        log.info("baked model written to %s in %.1f s", result.output, time.time() - started)
    return result


def _write(inp: BakeInputs, tmp: Path, opts: BakeOptions, fold: Fold, attach: AttachGates | None) -> stage.Built:
    """The merged and folded weights, plain config and tokenizer into `tmp`, then the verification."""
    dtype = DTYPES[opts.dtype]
    timings: dict[str, float] = {}
    place = plan_placement(inp.base.path)  # before any work: too little memory for the check fails here, at once
    t0 = time.time()
    weights = write_weights(inp, tmp, dtype, int(opts.max_shard_gb * 2**30), fold)
    cfg = plain_config(inp.base.config, opts.dtype)
    atomic.write_json(tmp / "config.json", cfg)
    atomic.write_json(tmp / "generation_config.json", generation_config(inp.base.path, cfg))
    tokenizer = copy_tokenizer(inp.base.path, tmp)
    check_names(tmp)
    timings["write_s"], rss_write = round(time.time() - t0, 2), _peak_rss_mib()
    t0 = time.time()
    report = verify(tmp, inp.base.path, inp.trained, inp.gates, dtype, opts, attach, place)
    timings["verify_s"] = round(time.time() - t0, 2)
    metrics = {
        "verification": report,
        "rotation_stats": {str(i): rotation_stats(A) for i, A in sorted(inp.gates.items())},
        "lora": inp.lora_config,
        "weights": weights,
        "timings": timings,
        "peak_rss_mib": {"after_write": rss_write, "after_verify": _peak_rss_mib()},
    }
    outputs = {
        "files": sorted(p.name for p in tmp.iterdir() if p.is_file()),
        "dtype": opts.dtype,
        "tokenizer_files": tokenizer,
        "architecture": "Phi3ForCausalLM",
    }
    return stage.Built(metrics, outputs)
