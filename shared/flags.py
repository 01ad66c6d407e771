"""Command-line flags generated from the typed option models, so each option is declared once: its default, bounds
and help live on the model's field (`Field(default, ge=..., description=...)`), and argparse, `--help`, the
pipeline's stage commands (`to_argv`) and the validation all come from there.

    add(parser, BakeOptions)                       --dtype, --max-shard-gb, ... with choices and defaults in help
    opts = parse(BakeOptions, args)                only the flags given; the model's defaults for the rest
    to_argv(opts)                                  ["--dtype", "float32"]: the flags that differ from the defaults

Nested models are reached by dotted paths (`add(parser, TrainConfig, ["train.max_steps"])` gives --max-steps).
Field kinds: bool (--x / --no-x), scalars and Literal choices, lists (nargs="+"), dict[KEY, number] and
dict[KEY, Model] (repeatable KEY=VALUE; for a model, one flag per numeric field of it).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shared.config import StrictModel, validate


@dataclass(frozen=True)
class _Option:
    path: str  # dotted, e.g. "train.max_steps" or "max_shard_gb"
    field: FieldInfo
    sub: str | None = None  # for dict[KEY, Model]: the model's field this flag sets

    @property
    def extra(self) -> dict[str, Any]:
        """The field's `json_schema_extra`: `flags` (renames, e.g. {"kl": "max-kl"}) and `key` (KEY=VALUE's name)."""
        extra = self.field.json_schema_extra
        return extra if isinstance(extra, dict) else {}

    @property
    def flag(self) -> str:
        name = self.sub or self.path.rsplit(".", 1)[-1]
        renames = self.extra.get("flags")
        renamed = renames.get(name) if isinstance(renames, dict) else None
        return "--" + str(renamed or name.replace("_", "-"))

    @property
    def key(self) -> str:
        return str(self.extra.get("key", "KEY"))

    @property
    def dest(self) -> str:
        return f"{self.path}:{self.sub}" if self.sub else self.path


def _strip_optional(tp: Any) -> Any:
    """X from `X | None` and from `Annotated[X, ...]`."""
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            tp = rest[0]
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


def _description(f: FieldInfo) -> str:
    """The field's description, or that of an `Annotated[X, Field(description=...)]` inside `X | None`."""
    if f.description:
        return f.description
    for member in get_args(f.annotation) or ():
        for meta in get_args(member)[1:] if get_origin(member) is Annotated else ():
            if isinstance(meta, FieldInfo) and meta.description:
                return meta.description
    return ""


def _literal(tp: Any) -> tuple | None:
    tp = _strip_optional(tp)
    return get_args(tp) if get_origin(tp) is Literal else None


def _field(model: type[BaseModel], path: str) -> FieldInfo:
    *parents, leaf = path.split(".")
    for name in parents:
        model = _strip_optional(model.model_fields[name].annotation)
    return model.model_fields[leaf]


def _options(model: type[BaseModel], paths: Iterable[str] | None) -> list[_Option]:
    out = []
    for path in paths if paths is not None else list(model.model_fields):
        f = _field(model, path)
        tp = _strip_optional(f.annotation)
        if get_origin(tp) is dict and isinstance(get_args(tp)[1], type) and issubclass(get_args(tp)[1], BaseModel):
            out += [_Option(path, f, sub) for sub in get_args(tp)[1].model_fields]
        else:
            out.append(_Option(path, f))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return format(value, "g") if isinstance(value, float) else str(value)


def _default(f: FieldInfo) -> Any:
    return f.get_default(call_default_factory=True)


def _keyed(keys: tuple | None, kind: type, opt: _Option):
    """argparse type for KEY=VALUE."""

    def parse(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if not sep or (keys is not None and key not in keys):
            allowed = f" with {opt.key} one of {', '.join(map(str, keys))}" if keys else ""
            raise argparse.ArgumentTypeError(f"{text!r}: expected {opt.key}=VALUE{allowed}")
        try:
            return key, kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a {kind.__name__}") from None

    parse.__name__ = opt.flag
    return parse


def add(
    parser: argparse.ArgumentParser, model: type[BaseModel], paths: Iterable[str] | None = None, overrides: bool = False
) -> None:
    """One flag per option of `model` (or per dotted path in `paths`), help and choices from the field.

    `overrides`: the flags override a config file's values (so the file, not the model, has the default)."""
    for opt in _options(model, paths):
        f, tp = opt.field, _strip_optional(opt.field.annotation)
        help_ = _description(f).replace("%", "%%")
        default = None if overrides or f.is_required() else _default(f)
        kw: dict[str, Any] = {"dest": opt.dest, "default": None, "metavar": opt.flag[2:].upper().replace("-", "_")}
        if f.is_required() and not overrides:
            kw["required"] = True
        if overrides:
            help_ += f"{'; ' if help_ else ''}overrides the config's {opt.path}"
        if opt.sub is not None:
            keys, sub_model = _literal(get_args(tp)[0]), get_args(tp)[1]
            sub_field = sub_model.model_fields[opt.sub]
            kind = _strip_optional(sub_field.annotation)
            help_ = (sub_field.description or opt.sub).replace("%", "%%")
            shown = {k: getattr(v, opt.sub) for k, v in (default or {}).items()}
            kw.update(action="append", type=_keyed(keys, kind, opt), metavar=f"{opt.key}=VALUE")
            help_ += f"; repeatable (default {_fmt(shown)})" if shown else "; repeatable"
        elif tp is bool:
            kw.pop("metavar")
            kw.update(action=argparse.BooleanOptionalAction)
            help_ += f" (default {'on' if default else 'off'})"
        elif get_origin(tp) is dict:
            keys, kind = _literal(get_args(tp)[0]), get_args(tp)[1]
            kw.update(action="append", type=_keyed(keys, kind, opt), metavar=f"{opt.key}=VALUE")
            help_ += f"; repeatable (default {_fmt(default)})" if default else "; repeatable"
        else:
            element = _strip_optional(get_args(tp)[0]) if get_origin(tp) in (list, tuple) else tp
            choices = _literal(element)
            if get_origin(tp) in (list, tuple):
                kw["nargs"] = "+"
            if choices:
                kw["choices"] = choices
                if get_origin(tp) in (list, tuple):
                    kw["metavar"] = kw["metavar"].rstrip("S")
                    help_ += f" (any of {' '.join(map(str, choices))})"
                else:
                    kw.pop("metavar")
            elif element in (int, float, str):
                kw["type"] = element
            if default is not None:
                help_ += f" (default {_fmt(default)})"
        parser.add_argument(opt.flag, help=help_, **kw)


def given(args: argparse.Namespace, model: type[BaseModel], paths: Iterable[str] | None = None) -> dict[str, Any]:
    """{dotted path: value} of the flags given on the command line (KEY=VALUE lists become dicts)."""
    out: dict[str, Any] = {}
    for opt in _options(model, paths):
        value = getattr(args, opt.dest, None)
        if value is None:
            continue
        if opt.sub is not None:
            per_key = out.setdefault(opt.path, {})
            for key, v in value:
                per_key.setdefault(key, {})[opt.sub] = v
        elif isinstance(value, list) and value and isinstance(value[0], tuple):
            out[opt.path] = dict(value)
        else:
            out[opt.path] = value
    return out


M = typing.TypeVar("M", bound=StrictModel)


def parse(model: type[M], args: argparse.Namespace, base: dict[str, Any] | None = None) -> M:
    """The model from `base` (e.g. a config section) overlaid with the flags given; errors name the flag."""
    data = dict(base or {})
    data.update(given(args, model))
    return validate(model, data, "command line")


def to_argv(opts: BaseModel, model: type[BaseModel] | None = None) -> list[str]:
    """The flags of `model` (default: `opts`'s own) that reproduce `opts` on a command line whose parser has
    `model`'s defaults: only the values that differ. `opts` may be a subclass carrying more fields (a profile's
    section): those, and its own defaults, do not count."""
    model = model or type(opts)
    argv: list[str] = []
    for opt in _options(model, None):
        value = getattr(opts, opt.path)
        default = _default(opt.field)
        if opt.sub is not None:
            pairs = [
                f"{k}={_fmt(getattr(v, opt.sub))}"
                for k, v in value.items()
                if default is None or k not in default or getattr(default[k], opt.sub) != getattr(v, opt.sub)
            ]
            for pair in pairs:
                argv += [opt.flag, pair]
            continue
        if value == default:
            continue
        tp = _strip_optional(opt.field.annotation)
        if tp is bool:
            argv.append(opt.flag if value else "--no-" + opt.flag[2:])
        elif get_origin(tp) is dict:
            for k, v in value.items():
                if not default or default.get(k) != v:
                    argv += [opt.flag, f"{k}={_fmt(v)}"]
        elif isinstance(value, (list, tuple)):
            argv += [opt.flag, *map(str, value)]
        elif value is not None:
            argv += [opt.flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
