"""Tables as a notebook shows them: counts as integers, measurements to three significant digits, and a
run's config as one short row per section instead of one wrapped dataclass repr."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import pandas as pd
from pandas.io.formats.style import Styler


def number(value: Any, digits: int = 3) -> str:
    """An integer as an integer, any other real to `digits` significant digits (no exponent below 10⁶), NaN
    and None as "–"; anything else as str()."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if value != 0 and 10 ** digits <= abs(value) < 1e6:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def styled(table: pd.DataFrame, digits: int = 3) -> Styler:
    """`table` for display: `number` in every cell, headers on one line."""
    return (table.style.format(lambda v: number(v, digits))
            .set_table_styles([{"selector": "th", "props": "white-space: nowrap;"}]))


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if dataclasses.is_dataclass(value) or isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _setting(value: Any) -> str:
    """A config value as it would be typed: exact numbers, tuples as (a, b), the empty string as ""."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(map(_setting, value)) + ")"
    return '""' if value == "" else str(value)


def config_table(cfg: Any) -> Styler:
    """A (frozen dataclass) config as a table: one row per section (top-level fields under "run"), the
    section's fields as `key = value` pairs; nested keys are dotted, as `make_config` overrides spell them."""
    sections: dict[str, list[str]] = {}
    for key, value in _flat(cfg).items():
        section, _, name = key.partition(".") if "." in key else ("run", "", key)
        sections.setdefault(section, []).append(f"{name} = {_setting(value)}")
    table = pd.DataFrame({"settings": {s: " · ".join(items) for s, items in sections.items()}})
    table.index.name = "section"
    return table.style.set_properties(**{"text-align": "left"}).set_table_styles(
        [{"selector": "th", "props": "text-align: left; vertical-align: top;"}])
