"""Backend options declared once: `Option` and `Argument` records, ``key=value`` lists and typed, range-checked values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from safetypairs.utils import Range, check_ranges

# What an option's value must be, in messages and in the help of ``safetypairs backends``.
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
# The texts that leave an option whose default is None unset.
_UNSET = ("", "none", "default")


@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a backend, declared once in its class's ``OPTIONS`` mapping.

    The help ``safetypairs backends`` prints, the checks run before any model loads and the values
    ``from_spec`` receives all derive from this record.

    Attributes:
        type: ``int``, ``float``, ``bool`` (``true/false``, ``1/0``, ``yes/no``, ``on/off``), ``str``, or a tuple
            of the allowed texts.
        help: one line saying what the option does (and, for a default of ``None``, what unset means).
        default: what ``from_spec`` gets when the option is not given; ``None`` leaves it unset, and then
            ``none``, ``default`` or an empty value also leave it unset.
        range: the `utils.Range` a number must lie in.
    """

    type: type | tuple[str, ...]
    help: str
    default: Any = None
    range: Range | None = None

    def describe(self) -> str:
        """The help line: what the option does, then its type, range and default."""
        kind = f"one of {', '.join(self.type)}" if isinstance(self.type, tuple) else _EXPECTED[self.type]
        if self.range is not None:
            kind += f" in {self.range}" if str(self.range)[0] in "[(" else f" {self.range}"
        default = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f"{self.help} [{kind}" + ("" if default is None else f"; default {default}") + "]"


@dataclass(frozen=True)
class Argument:
    """What a backend's spec names between ``alias:`` and its options: ``alias:<argument>[,key=value,...]``.

    The argument ends at the first comma (a path with a comma cannot be named).

    Attributes:
        usage: how to write it, e.g. ``"<hub id or local path>"``.
        default: the value when the spec names none; ``None``: the spec must name one. A backend with a default
            also reads ``alias:key=value`` as options only.
        choices: the allowed values (empty: any text).
        hub: it names a Hugging Face hub id or a local ``save_pretrained`` folder (a run records its revision).
    """

    usage: str
    default: str | None = None
    choices: tuple[str, ...] = ()
    hub: bool = False

    def check(self, alias: str, value: str | None) -> str:
        """The argument ``from_spec`` gets: ``value``, or the default when the spec names none.

        Raises:
            ValueError: when it is missing and has no default, or not among ``choices`` (naming them).
        """
        value = value or self.default
        if value is None:
            raise ValueError(f"{alias} needs {self.usage} after '{alias}:'")
        if self.choices and value not in self.choices:
            raise ValueError(f"unknown {alias} {self.usage} {value!r}; allowed: {', '.join(self.choices)}")
        return value


# The argument of backends that load a Hugging Face model: ``alias:<hub id or local path>[,key=value,...]``.
HUB_MODEL = Argument("<hub id or local path>", hub=True)


def option_help(entry: Option | str) -> str:
    """The help line of one ``OPTIONS`` entry: an `Option`'s description, or a third-party backend's help text."""
    return entry.describe() if isinstance(entry, Option) else str(entry)


def parse_options(arg: str | None) -> dict[str, str]:
    """Parse ``key=value,key=value`` backend options (values stay strings).

    Raises:
        ValueError: for an item without ``=`` or without a key.
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


def cast_options(owner: str, options: Mapping[str, Any], declared: Mapping[str, Option]) -> dict[str, Any]:
    """Check backend options against their declaration and cast them (text from a spec, or keyword values).

    Args:
        owner: the backend alias the messages name (e.g. ``"ocr-inpaint"``).
        options: option name -> value as given.
        declared: the backend's ``OPTIONS``: every allowed option -> its `Option`.

    Returns:
        Every declared option -> its cast value, or its default when not given.

    Raises:
        ValueError: for an unknown option (naming the allowed ones), a value that does not cast (naming the
            option, the value and the expected type or texts) or one out of its range (naming the range).
    """
    unknown = sorted(set(options) - set(declared))
    if unknown:
        allowed = f"allowed: {', '.join(declared)}" if declared else f"{owner} takes no options"
        raise ValueError(f"unknown {owner} option(s) {unknown}; {allowed}")
    values = {name: option.default for name, option in declared.items()}
    values.update({name: _cast(owner, name, value, declared[name]) for name, value in options.items()})
    ranges = {name: option.range for name, option in declared.items() if option.range is not None}
    check_ranges(f"{owner} option", {n: v for n, v in values.items() if v is not None}, ranges)
    return values


def _cast(owner: str, name: str, value: Any, option: Option) -> Any:
    if option.default is None and (value is None or str(value).strip().lower() in _UNSET):
        return None
    if isinstance(option.type, tuple):
        if str(value) in option.type:
            return str(value)
        expected = f"one of {', '.join(option.type)}"
    else:
        try:
            if option.type is bool:
                return parse_bool(value, name)
            if option.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return option.type(value)
        except (TypeError, ValueError):
            expected = _EXPECTED.get(option.type, getattr(option.type, "__name__", str(option.type)))
    raise ValueError(f"{owner} option {name} must be {expected}, got {value!r}")
