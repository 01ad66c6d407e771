"""The tiny-model stage: a tiny Phi-3 and its tokenizer, random or pre-trained on a split (shared.stage contract).

Built once per content: the output's manifest names the split it was pre-trained on (by hash) and every option, so
an unchanged rerun is skipped; and each build is kept in the machine's cache ($SO8T_CACHE, default ~/.cache/so8t,
like the compiled llama.cpp), so a fresh data folder gets the same base in seconds instead of minutes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from services.tiny_model.options import TinyOptions
from services.tiny_model.pretrain import documents, pretrain
from shared import atomic, logs, manifest, stage
from shared.config import config_hash
from shared.errors import InputError
from shared.tiny import write_tiny_model

log = logs.get("tiny-model")
STAGE = "tiny-model"
BUILDER_VERSION = 1
CACHE_MARKER = "built.json"


def cache_root() -> Path:
    return Path(os.environ.get("SO8T_CACHE") or Path.home() / ".cache" / "so8t")


def build(
    output: str | Path, opts: TinyOptions, pretrain_on: str | Path | None = None, force: bool = False
) -> stage.StageResult:
    if pretrain_on is not None and not Path(pretrain_on).is_file():
        raise InputError(f"{pretrain_on}: split to pretrain on not found (run the dataset stage first)")
    inputs = {"pretrain_on": manifest.describe_input(pretrain_on)} if pretrain_on else {}
    config = {"builder_version": BUILDER_VERSION, "pretrained": pretrain_on is not None, **opts.model_dump()}
    spec = stage.Spec(STAGE, Path(output), inputs, config)
    cached = cache_root() / f"tiny-model-{config_hash([spec.digest, manifest.input_hashes(inputs)])[:16]}"
    return stage.run(spec, lambda tmp: _write(tmp, opts, Path(pretrain_on) if pretrain_on else None, cached), force)


def _write(out: Path, opts: TinyOptions, pretrain_on: Path | None, cached: Path) -> stage.Built:
    marker = cached / CACHE_MARKER
    if marker.is_file():
        for f in sorted(cached.iterdir()):
            if f.name != CACHE_MARKER:
                shutil.copy2(f, out / f.name)
        log.info("tiny model from the cache %s", cached)
        return stage.Built(json.loads(marker.read_text(encoding="utf-8")) | {"from_cache": str(cached)})
    docs, text = documents(pretrain_on) if pretrain_on else ([], [])
    write_tiny_model(out, opts.seed, opts.vocab, text, **opts.sizes())
    metrics = {"pretraining": pretrain(out, docs, opts) if docs and opts.pretrain_steps else None}
    try:
        with atomic.staging_dir(cached) as tmp:
            for f in sorted(out.iterdir()):
                shutil.copy2(f, tmp / f.name)
            atomic.write_json(tmp / CACHE_MARKER, metrics)
    except OSError as err:  # a read-only or full cache costs the next build time, not this one its result
        log.warning("could not keep the tiny model in the cache %s: %s", cached, err)
    return stage.Built(metrics)
