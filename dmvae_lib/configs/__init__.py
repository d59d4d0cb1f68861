"""Typed, frozen run configurations and their named presets.

Each stage has a frozen dataclass tree (one dataclass per component) and a preset registry
`{"smoke": …, "cpu": …, "imagenet256": …}`. Presets differ only in numbers, never in code path.

    cfg = make_config("toy", "cpu", {"align.steps": 800, "seed": 3})

Overrides use dotted keys for nested fields; an unknown key, an unknown preset or a value of the wrong type
raises `ConfigError` before any work starts. `to_dict`/`from_dict` round-trip through JSON exactly, and
`from_dict` is just as strict.

Types are checked for every field, with no fall-through: `int`, `str` and `bool` fields take exactly that type
(`True` is no int, `3.0` no int); `tuple[...]` fields take a list or tuple whose items are checked; mapping
fields take a mapping. A `float` field takes a float, an int (3 → 3.0), or a string that Python's `float()`
reads as a finite number, e.g. "1e-4": YAML 1.1 (PyYAML, so papermill's `-y` and the pipeline's `--params`
files) reads `1e-4` without a decimal point as the *string* "1e-4", and refusing it would punish the natural
spelling of a learning rate. The stored value is always the float; any other string ("fast", "nan") raises.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from . import generation, joint, latents, released, study, teacher, tokenizer, toy
from .errors import ConfigError

PRESETS = ("smoke", "cpu", "imagenet256")  # every stage's presets carry exactly these names
STAGES: dict[str, tuple[type, dict[str, dict[str, Any]]]] = {
    "toy": (toy.ToyConfig, toy.PRESETS),
    "tokenizer": (tokenizer.TokenizerStageConfig, tokenizer.PRESETS),
    "teacher": (teacher.TeacherStageConfig, teacher.PRESETS),
    "joint": (joint.JointStageConfig, joint.PRESETS),
    "latents": (latents.LatentsStageConfig, latents.PRESETS),
    "generation": (generation.GenerationStageConfig, generation.PRESETS),
    "study": (study.StudyConfig, study.PRESETS),
    "released": (released.ReleasedStageConfig, released.PRESETS),
}


def _float(value: Any, key: str) -> float:
    """An int, a float or a numeric string (YAML 1.1 reads `1e-4` as "1e-4") as a float; anything else
    raises."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"config key {key!r} expects float, got the string {value!r}, "
                          "which is not a finite number")
    raise ConfigError(f"config key {key!r} expects float, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the field type `hint` (see the module docstring); a mismatch raises
    ConfigError."""
    origin = typing.get_origin(hint)
    if hint is float:
        return _float(value, key)
    if hint in (int, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"config key {key!r} expects {hint.__name__}, "
                              f"got {value!r} ({type(value).__name__})")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} expects a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / X | None
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    raise ConfigError(f"config key {key!r} has a field type {hint!r} that configs cannot check; "
                      "use bool, int, float, str, tuple[...], dict or a config dataclass")


def _apply(obj: Any, key: str, value: Any, full_key: str) -> Any:
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown config key {full_key!r} (in {type(obj).__name__}: {known})")
    if rest:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"config key {full_key!r}: {head!r} has no sub-keys")
        return dataclasses.replace(obj, **{head: _apply(child, rest, value, full_key)})
    if hints[head] is dict:  # a mapping field (e.g. a study's per-notebook overrides): keys merge into it
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {full_key!r} expects a mapping, got {value!r}")
        return dataclasses.replace(obj, **{head: {**getattr(obj, head), **value}})
    return dataclasses.replace(obj, **{head: _coerce(value, hints[head], full_key)})


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (JSON) mapping; unknown keys raise, missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)} for {cls.__name__}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def make_config(stage: str, preset: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The `preset` config of `stage` with dotted-key `overrides` applied (all strictly checked)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    cls, presets = STAGES[stage]
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for {stage}; known: {', '.join(presets)}")
    cfg = cls()
    for key, value in [*presets[preset].items(), *dict(overrides or {}).items()]:  # a preset, then overrides
        cfg = _apply(cfg, key, value, key)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
