"""Parameter values of the recipe language and how they resolve for one tensor.

A parameter value is one of (mergekit's forms):
  * a number (or bool):                    weight: 0.5
  * a gradient list, interpolated piecewise-linearly over the layers of a slice at t = idx / (n - 1):
                                           weight: [0.2, 0.8]
  * a list of conditions, the first whose `filter` is a substring of the tensor name wins (no filter = default);
    each `value` is itself a number or a gradient:
                                           weight: [{filter: self_attn, value: 0.3}, {value: [0.5, 1.0]}]
Tensors outside the decoder layers (embeddings, final norm, LM head) resolve at t = 0, i.e. a gradient's first value.
"""

from __future__ import annotations

import math
from typing import Any

ParamValue = Any  # float | bool | list[float] | list[dict]


def numbers_from_text(value: ParamValue) -> ParamValue:
    """`value` with every string that reads as a number made that number, inside gradients and conditions too.

    YAML 1.1 (PyYAML, what mergekit and lazymerge load recipes with) reads `5e-1` and `1e-3` as strings: its floats
    need a dot. mergekit takes them anyway (its pydantic fields convert a numeric string to a float), so the same
    recipe must mean the same here. Other strings are left for `check_value` to refuse."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    if isinstance(value, list):
        return [numbers_from_text(v) if not isinstance(v, dict)
                else {**v, "value": numbers_from_text(v["value"])} if "value" in v else v for v in value]
    return value


def check_value(value: ParamValue, where: str) -> None:
    """Raise ValueError naming `where` if `value` is not a well-formed parameter value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{where}: value {value!r} is not finite")
        return
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: empty list")
        if all(isinstance(v, dict) for v in value):
            for i, cond in enumerate(value):
                extra = set(cond) - {"filter", "value"}
                if extra or "value" not in cond:
                    raise ValueError(f"{where}[{i}]: a condition is {{filter: STR, value: V}}, got {cond!r}")
                if "filter" in cond and not isinstance(cond["filter"], str):
                    raise ValueError(f"{where}[{i}].filter must be a string")
                if isinstance(cond["value"], list) and any(isinstance(v, dict) for v in cond["value"]):
                    raise ValueError(f"{where}[{i}].value: conditions cannot nest")
                check_value(cond["value"], f"{where}[{i}].value")
            return
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}[{i}]: a gradient holds numbers, got {v!r}")
            if not math.isfinite(float(v)):
                raise ValueError(f"{where}[{i}]: value {v!r} is not finite")
        return
    raise ValueError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, got {value!r}")


def gradient_at(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of `values` at t in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    span = len(values) - 1
    pos = min(max(t, 0.0), 1.0) * span
    i0 = min(int(math.floor(pos)), span)
    i1 = min(i0 + 1, span)
    frac = pos - i0
    return float(values[i0]) * (1.0 - frac) + float(values[i1]) * frac


def resolve(value: ParamValue, tensor_name: str, t: float) -> float | bool | None:
    """The value of a parameter for `tensor_name` at layer position `t`; None if no condition matches."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if value and all(isinstance(v, dict) for v in value):
        for cond in value:
            f = cond.get("filter")
            if f is None or f in tensor_name:
                return resolve(cond["value"], tensor_name, t)
        return None
    return gradient_at(value, t)


def all_numbers(value: ParamValue) -> list[float]:
    """Every number a value can take (for range checks at validation time)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    out: list[float] = []
    for v in value:
        out.extend(all_numbers(v["value"]) if isinstance(v, dict) else [float(v)])
    return out
