"""The one skeleton every stage follows (docs/design.md "Stages and manifests").

    spec = Spec("bake", output, inputs={...describe_input...}, config={...})
    result = stage.run(spec, build, force=force)

1. Up to date? The output's manifest names the same stage, the same input hashes and the same config hash, and
   every file it lists is there with its size: the stage is skipped.
2. Otherwise `build(tmp)` fills a staging directory beside the output (leftovers of killed runs, `.<output>.*.tmp`,
   are removed first) and returns the metrics and outputs for the manifest.
3. The manifest is written last, into the staging directory, which then replaces the output as a whole (fsynced
   and renamed). A failure anywhere leaves the previous output untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import atomic, logs, manifest
from shared.config import config_hash
from shared.errors import StageError

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
            built = build(tmp)
            m = manifest.build(spec.stage, spec.inputs, spec.config, spec.digest, started, built.metrics, built.outputs)
            m.update(built.extra)
            m["files"] = {
                p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            manifest.write(tmp, m)
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
