"""Backend options: ``key=value`` lists in spec strings, model arguments, booleans and typed, range-checked values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safetypairs.utils import Range, check_ranges


def parse_options(arg: str | None) -> dict[str, str]:
    """Parse ``key=value,key=value`` backend options (values stay strings).

    Raises:
        ValueError: for an item without ``=``.
    """
    if not arg:
        return {}
    options = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad backend option {item!r} in {arg!r}; expected key=value[,key=value]")
        options[key.strip()] = value.strip()
    return options


def split_model_arg(arg: str | None, alias: str) -> tuple[str, dict[str, str]]:
    """Split a model backend's ``"<model id or path>[,key=value,...]"`` into the model and its options.

    Raises:
        ValueError: when the model is missing.
    """
    model, _, rest = (arg or "").partition(",")
    if not model.strip():
        raise ValueError(f"{alias} needs a model: {alias}:<hub id or local path>[,key=value,...]")
    return model.strip(), parse_options(rest)


def parse_bool(value: Any, name: str) -> bool:
    """Read a boolean backend option given as a bool or as text (``true/false``, ``1/0``, ``yes/no``, ``on/off``).

    Raises:
        ValueError: for any other value, naming the option.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name} expects true or false, got {value!r}")


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def cast_options(owner: str, options: Mapping[str, Any], types: Mapping[str, Any],
                 ranges: Mapping[str, Range] | None = None) -> dict[str, Any]:
    """Check backend options' names and cast their values (text from a spec, or keyword values).

    Args:
        owner: the backend alias the messages name (e.g. ``"ocr-inpaint"``).
        options: option name -> value as given.
        types: every allowed option -> ``int``, ``float``, ``bool`` (read by `parse_bool`), ``str``, or a
            tuple of the allowed texts.
        ranges: option -> the `utils.Range` its cast value must lie in.

    Returns:
        Option name -> cast value, for the options given (defaults stay the caller's).

    Raises:
        ValueError: for an unknown option (naming the allowed ones), a value that does not cast (naming the
            option, the value and the expected type or texts) or one out of its range (naming the range).
    """
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise ValueError(f"unknown {owner} option(s) {unknown}; allowed: {', '.join(types)}")
    values = {name: _cast(owner, name, value, types[name]) for name, value in options.items()}
    check_ranges(f"{owner} option", values, ranges or {})
    return values


def _cast(owner: str, name: str, value: Any, kind: Any) -> Any:
    if isinstance(kind, tuple):
        if str(value) in kind:
            return str(value)
        expected = f"one of {', '.join(kind)}"
    else:
        try:
            if kind is bool:
                return parse_bool(value, name)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
        except (TypeError, ValueError):
            expected = _EXPECTED.get(kind, getattr(kind, "__name__", str(kind)))
    raise ValueError(f"{owner} option {name} must be {expected}, got {value!r}")
