"""Stage manifests: inputs with content hashes, config, versions, timings, metrics. Written last, atomically.

A stage whose manifest names the same inputs (by hash) and the same config hash is up to date and is skipped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared import atomic

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_VERSIONED = ("so8t", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "llama_cpp_python", "gguf")


def utc_stamp(t: float | None = None) -> str:
    """`t` (default now) as the ISO-8601 UTC stamp every manifest and status file uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | Path, exclude: Iterable[str] = (MANIFEST,)) -> str:
    """One hash over every file under `root` (relative path + content), skipping names in `exclude`."""
    root = Path(root)
    skip = set(exclude)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip and not p.name.startswith("."):
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def describe_input(path: str | Path) -> dict[str, Any]:
    """Path and content hash of a file or directory input."""
    p = Path(path)
    if p.is_dir():
        return {"path": str(p), "kind": "dir", "sha256": sha256_tree(p)}
    return {"path": str(p), "kind": "file", "sha256": sha256_file(p), "bytes": p.stat().st_size}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def read(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def input_hashes(inputs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: d["sha256"] for name, d in inputs.items()}


def is_up_to_date(directory: str | Path, stage: str, inputs: dict[str, dict[str, Any]], config_hash: str) -> bool:
    """True when `directory` holds a manifest of `stage` with the same input hashes and config hash."""
    m = read(directory)
    if not m or m.get("stage") != stage or m.get("config_hash") != config_hash:
        return False
    return input_hashes(m.get("inputs", {})) == input_hashes(inputs)


def build(
    stage: str,
    inputs: dict[str, dict[str, Any]],
    config: dict[str, Any],
    config_hash: str,
    started: float,
    metrics: dict[str, Any],
    outputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    finished = time.time()
    return {
        "stage": stage,
        "inputs": inputs,
        "config": config,
        "config_hash": config_hash,
        "versions": versions(),
        "started_at": utc_stamp(started),
        "finished_at": utc_stamp(finished),
        "seconds": round(finished - started, 3),
        "metrics": metrics,
        "outputs": outputs or {},
    }


def write(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    atomic.write_json(path, manifest)
    return path
