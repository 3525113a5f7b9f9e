"""Pass names -> classes, and the pipeline spec parser.

A spec is a comma-separated list: a pass name optionally followed by ``:option=value``;
further ``option=value`` items belong to the last pass named. A bare item after a list-valued
option (``at=layer2,layer3``) extends that list. ``fold-bn,prune-channels:ratio=0.5,criterion=l1``
is two passes, the second with two options.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from slimfx.errors import PassSpecError
from slimfx.passes.base import Pass, option_name

PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if not cls.name or cls.name in PASSES:
        raise PassSpecError(f"pass name {cls.name!r} is empty or already registered; give the pass class a unique name")
    PASSES[cls.name] = cls
    return cls


def available() -> str:
    return ", ".join(sorted(PASSES))


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"did you mean 'ratio'? "`` for the nearest choice, or nothing when none is near."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def pass_class(name: str) -> type[Pass]:
    try:
        return PASSES[name]
    except KeyError:
        raise PassSpecError(
            f"unknown pass {name!r}; {did_you_mean(name, list(PASSES))}valid passes: {available()}"
        ) from None


def option_types(cls: type[Pass]) -> dict[str, Any]:
    """Option name as typed (kebab-case) -> its annotated type."""
    hints = typing.get_type_hints(cls)
    return {option_name(f.name): hints[f.name] for f in dataclasses.fields(cls)}


def parse_pipeline(spec: str) -> list[Pass]:
    """Turn a spec string into pass objects, rejecting unknown names, options and values."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise PassSpecError(f"empty item in pipeline spec {spec!r}; expected e.g. 'fold-bn,prune-channels:ratio=0.5'")
    pipeline: list[tuple[str, dict[str, str]]] = []
    last_option: str | None = None
    for item in items:
        if ":" in item:
            name, _, option = item.partition(":")
            pass_class(name.strip())
            pipeline.append((name.strip(), {}))
            last_option = _add_option(pipeline[-1], option)
        elif "=" in item:
            if not pipeline:
                raise PassSpecError(f"option {item!r} comes before any pass name in {spec!r}")
            last_option = _add_option(pipeline[-1], item)
        elif pipeline and last_option and _is_list(pipeline[-1][0], last_option) and item not in PASSES:
            pipeline[-1][1][last_option] += "," + item
        else:
            pass_class(item)
            pipeline.append((item, {}))
            last_option = None
    return [make_pass(name, options) for name, options in pipeline]


def _add_option(entry: tuple[str, dict[str, str]], item: str) -> str:
    name, options = entry
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise PassSpecError(f"{name}: expected option=value, got {item!r}; 'slimfx passes {name}' lists its options")
    if key in options:
        raise PassSpecError(f"{name}: option '{key}' given twice")
    options[key] = value.strip()
    return key


def _is_list(pass_name: str, option: str) -> bool:
    kind = option_types(pass_class(pass_name)).get(option)
    return typing.get_origin(kind) is tuple


def make_pass(name: str, options: dict[str, str]) -> Pass:
    """Build pass ``name`` from string option values, converting each to its field's type."""
    cls = pass_class(name)
    types_ = option_types(cls)
    fields = {option_name(f.name): f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in types_:
            valid = ", ".join(types_) or "none"
            raise PassSpecError(
                f"{name}: unknown option '{key}'; {did_you_mean(key, list(types_))}valid options: {valid}"
            )
        try:
            values[fields[key]] = convert(name, key, raw, types_[key])
        except PassSpecError as exc:
            hint = cls.value_hints.get((key, raw))
            if hint is None:
                raise
            raise PassSpecError(f"{exc}; {hint}") from None
    return cls(**values)


def convert(pass_name: str, option: str, raw: str, kind: Any) -> Any:
    """Convert ``raw`` to ``kind`` (bool, int, float, str, Literal, tuple[str, ...], tuple[int, ...], X | None,
    and unions such as ``int | Literal["auto"]``, whose members are tried in order)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if raw.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:
            try:
                return convert(pass_name, option, raw, member)
            except PassSpecError:
                continue
        try:
            return convert(pass_name, option, raw, inner[-1])
        except PassSpecError:
            if len(inner) == 1:
                raise
            expected = " or ".join(type_text(a) for a in inner)
            raise PassSpecError(f"{pass_name}: invalid value {raw!r} for '{option}'; expected {expected}") from None
    if origin is Literal:
        if raw not in args:
            nearest = did_you_mean(raw, [str(a) for a in args]).strip()
            raise PassSpecError(
                f"{pass_name}: invalid value {raw!r} for '{option}'; choose one of: {', '.join(map(str, args))}"
                + (f" ({nearest})" if nearest else "")
            )
        return raw
    if origin is tuple:
        items = tuple(v.strip() for v in raw.split(",") if v.strip())
        return tuple(convert(pass_name, option, item, args[0]) for item in items) if args[0] is not str else items
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise PassSpecError(f"{pass_name}: invalid value {raw!r} for '{option}'; expected true or false")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise PassSpecError(f"{pass_name}: invalid value {raw!r} for '{option}'; expected {kind.__name__}") from None


def resolve_passes(passes: str | Sequence[Pass | str]) -> list[Pass]:
    """Accept a spec string or a list of pass objects and/or spec strings."""
    if isinstance(passes, str):
        return parse_pipeline(passes)
    resolved: list[Pass] = []
    for item in passes:
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, str):
            resolved.extend(parse_pipeline(item))
        else:
            raise PassSpecError(f"expected a Pass or a spec string, got {type(item).__name__}")
    return resolved


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    """One option of a pass as ``slimfx passes NAME`` lists it."""

    name: str  # as typed in a spec (kebab-case)
    kind: str  # its values, in words: "float", "l1|bn-scale|thinet", "patterns (comma-separated)"
    default: str
    help: str


def type_text(kind: Any) -> str:
    """An option's annotated type as a user types its values."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{type_text(inner[0])} or none" if len(inner) == 1 else " or ".join(map(type_text, inner))
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return "integers (comma-separated)" if args[0] is int else "names (comma-separated)"
    if kind is bool:
        return "true|false"
    return getattr(kind, "__name__", str(kind))


def _default_text(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def describe_options(cls: type[Pass]) -> list[OptionDoc]:
    """Every option of ``cls``: its spec name, values, default and line of help."""
    types_ = option_types(cls)
    return [
        OptionDoc(
            option_name(f.name),
            type_text(types_[option_name(f.name)]),
            _default_text(f.default),
            cls.option_help.get(f.name, ""),
        )
        for f in dataclasses.fields(cls)
    ]
