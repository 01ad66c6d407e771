"""Typed configuration: YAML files validated into pydantic models.

Unknown keys and wrong types are errors that name the file, the line and the dotted key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import InputError

T = TypeVar("T", bound="StrictModel")


class ConfigError(InputError, ValueError):
    """A configuration file (or command line) that does not validate; the message names file, line and key."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def digest(self, exclude: Any = None) -> str:
        """Stable content hash of the config, less the `exclude` fields (pydantic's include/exclude form)."""
        return config_hash(self.model_dump(mode="json", exclude=exclude))


def config_hash(config: Any) -> str:
    """Stable content hash of JSON-able settings: manifests compare it to decide whether a stage is up to date."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _key_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each dotted key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            p = path + (key.value,)
            lines[p] = key.start_mark.line + 1
            lines.update(_key_lines(value, p))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            p = path + (i,)
            lines[p] = item.start_mark.line + 1
            lines.update(_key_lines(item, p))
    return lines


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        line = None
        for n in range(len(loc), 0, -1):  # the deepest key that exists in the file
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{source}:{line}" if line else source
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def validate(model: type[T], data: Any, source: str = "<config>", lines: dict[tuple, int] | None = None) -> T:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, lines or {})) from None


def load_config(model: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load and validate `path`; `overrides` (dotted keys, e.g. from CLI flags) are applied before validation."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}:1: <root>: expected a mapping of keys, got {type(data).__name__}")
    data = dict(data or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        cursor = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
    return validate(model, data, str(path), _key_lines(node) if node is not None else {})
