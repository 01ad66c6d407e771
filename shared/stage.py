"""The one skeleton every stage follows (docs/design.md "Stages and manifests").

    spec = Spec("bake", output, inputs={...describe_input...}, config={...})
    result = stage.run(spec, build, force=force)

1. Up to date? The output's manifest names the same stage, the same input hashes and the same config hash, and
   every file it lists is there with its size: the stage is skipped.
2. Otherwise `build(tmp)` fills a staging directory beside the output (leftovers of killed runs, `.<output>.*.tmp`,
   are removed first) and returns the metrics and outputs for the manifest.
3. The manifest is written last, into the staging directory, which then replaces the output as a whole (fsynced
   and renamed). A failure anywhere leaves the previous output untouched; a write the disk refused (full, quota,
   read-only) is a DiskError naming the path and the cause.

The manifest lists every file with its size (`files`, what the skip checks) and its SHA-256 (`sha256`). A stage
that reads another's output describes it with `verified_input`: the content hash the skip needs anyway, and every
file checked against the manifest that wrote it, so a corrupted or half-copied upstream is an error naming the
file, never used.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import atomic, logs, manifest
from shared.config import config_hash
from shared.errors import InputError, StageError, write_failure

log = logs.get("stage")


@dataclass(frozen=True)
class Built:
    """What a build returns for the manifest: its figures, what it wrote, and any stage-specific top-level keys."""

    metrics: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    stage: str
    output: Path
    skipped: bool
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


@dataclass(frozen=True)
class Spec:
    """One stage's output and everything that decides it."""

    stage: str
    output: Path
    inputs: dict[str, dict[str, Any]]  # name -> shared.manifest.describe_input(...)
    config: dict[str, Any]
    digest: str = ""  # the config hash; defaults to config_hash(config)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if not self.digest:
            object.__setattr__(self, "digest", config_hash(self.config))

    def current(self) -> StageResult | None:
        """The output as a skipped result when it is up to date with these inputs and config, else None."""
        if not manifest.is_up_to_date(self.output, self.stage, self.inputs, self.digest):
            return None
        m = manifest.read(self.output) or {}
        missing = [
            name
            for name, size in m.get("files", {}).items()
            if not (self.output / name).is_file() or (self.output / name).stat().st_size != size
        ]
        if missing:
            log.warning("%s: manifest matches but %s is missing or changed size: rebuilding", self.output, missing[0])
            return None
        return StageResult(self.stage, self.output, True, m)


def publish(spec: Spec, build: Callable[[Path], Built], started: float | None = None) -> StageResult:
    """Build into a staging directory, write the manifest last, replace the output as a whole."""
    started = time.time() if started is None else started
    try:
        with atomic.staging_dir(spec.output) as tmp:
            try:
                built = build(tmp)
                m = manifest.build(
                    spec.stage, spec.inputs, spec.config, spec.digest, started, built.metrics, built.outputs
                )
                m.update(built.extra)
                listed = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
                m["files"] = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in listed}
                m["sha256"] = {p.relative_to(tmp).as_posix(): manifest.sha256_file(p) for p in listed}
                atomic.fault("staging-built")
                manifest.write(tmp, m)
            except Exception as err:  # while the staging directory still holds what filled the disk
                disk = write_failure(err, tmp)
                if disk is None:
                    raise
                raise disk from err
    except StageError as err:
        err.output = err.output or spec.output
        raise
    return StageResult(spec.stage, spec.output, False, m)


def run(spec: Spec, build: Callable[[Path], Built], force: bool = False, started: float | None = None) -> StageResult:
    """Skip when up to date (unless `force`), else publish a new output."""
    if not force and (done := spec.current()) is not None:
        log.info("%s is up to date (inputs and config match its manifest): skipped", spec.output)
        return done
    return publish(spec, build, started)


# --- reading another stage's output -----------------------------------------------------------------------------


def _file_digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file manifest.sha256_tree hashes (same selection, same order)."""
    return {
        p.relative_to(root).as_posix(): manifest.sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST and not p.name.startswith(".")
    }


def _tree_digest(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel, digest in digests.items():
        h.update(rel.encode() + b"\0")
        h.update(digest.encode() + b"\n")
    return h.hexdigest()


def _producer(directory: Path) -> dict[str, Any] | None:
    """The manifest of the stage that wrote `directory`, None when there is none; unreadable is an error."""
    path = directory / manifest.MANIFEST
    if not path.is_file():
        return None
    m = manifest.read(directory)
    if not isinstance(m, dict):
        raise InputError(f"{path}: unreadable manifest (corrupt or half-written): rebuild {directory}")
    return m


def _mismatch(path: Path, m: dict[str, Any], directory: Path, why: str) -> InputError:
    made_by = m.get("stage", "?")
    return InputError(
        f"{path}: {why}: not the file the {made_by} stage wrote ({directory / manifest.MANIFEST}); it is corrupt or "
        f"was changed since, and is not used: rebuild it (so8t {made_by} --force) or restore it"
    )


def check_files(directory: Path, m: dict[str, Any], digests: dict[str, str], names: list[str]) -> None:
    """Each of `names` (paths relative to `directory`) as its manifest `m` lists it: there, same size, same sha256."""
    sizes, hashes = m.get("files") or {}, m.get("sha256") or {}
    for name in names:
        path = directory / name
        if not path.is_file():
            raise _mismatch(path, m, directory, "missing")
        if name in sizes and path.stat().st_size != sizes[name]:
            raise _mismatch(path, m, directory, f"{path.stat().st_size} bytes, the manifest says {sizes[name]}")
        if name in hashes and digests[name] != hashes[name]:
            raise _mismatch(
                path, m, directory, f"sha256 {digests[name][:12]}… where the manifest says {hashes[name][:12]}…"
            )


def verified_input(path: str | Path) -> dict[str, Any]:
    """`manifest.describe_input(path)` (the same dict, so skips are unchanged), after checking `path` against the
    manifest of the stage that wrote it: a directory with a manifest.json, every file it lists; a file, against the
    manifest beside it when that lists it. Each file is read once, for both. Raises InputError naming the file."""
    p = Path(path)
    if p.is_dir():
        m = _producer(p)
        digests = _file_digests(p)
        if m is not None:
            listed = sorted(set(m.get("files") or {}) | set(m.get("sha256") or {}))
            check_files(p, m, digests, [n for n in listed if n != manifest.MANIFEST])
        return {"path": str(p), "kind": "dir", "sha256": _tree_digest(digests)}
    if not p.is_file():
        return manifest.describe_input(p)  # raises FileNotFoundError as it always did
    m = _producer(p.parent)
    digest = manifest.sha256_file(p)
    if m is not None and (p.name in (m.get("files") or {}) or p.name in (m.get("sha256") or {})):
        check_files(p.parent, m, {p.name: digest}, [p.name])
    return {"path": str(p), "kind": "file", "sha256": digest, "bytes": p.stat().st_size}


# --- helper processes -----------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> dict[str, Any]:
    """Popen keyword arguments that make the child get SIGKILL when this process dies (Linux prctl): a killed
    stage leaves no helper writing into its staging directory. Popen from the main thread only (the signal comes
    when the thread that started the child ends)."""
    if not sys.platform.startswith("linux"):
        return {}
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: die now
            os._exit(137)

    return {"preexec_fn": preexec}
