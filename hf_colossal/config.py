"""Typed option dataclasses that parse themselves from ``optim_args``-style strings.

Every user-facing option set in hf_colossal (an optimizer's ``optim_args``, a plugin's settings) is a frozen
dataclass deriving from :class:`OptionsConfig`. Each field carries a one-line ``help`` in its metadata; the type
annotation is the contract. :meth:`OptionsConfig.from_strings` turns ``{"key": "value"}`` (what
``TrainingArguments.optim_args`` holds, or a recipe's YAML after ``str()``) into the typed dataclass and raises
:class:`OptionsError` naming the bad key and listing every valid key with its type and default.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None`` and
``tuple[str, ...]`` (items separated by ``|`` because ``optim_args`` already splits on ``,`` and ``=``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null"}
LIST_SEPARATOR = "|"


class OptionsError(ValueError):
    """A bad option: unknown key, wrong type, or value out of range. The message lists the valid choices."""


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe_type(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"list of str separated by '{LIST_SEPARATOR}'"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _convert(text: str, annotation: Any) -> Any:
    """Convert ``text`` to ``annotation``; raise ValueError with no context (the caller adds the key)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and text.strip().lower() in _NONE:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(text, option)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if text == str(choice):
                return choice
        raise ValueError
    if origin is tuple:
        return tuple(item for item in text.split(LIST_SEPARATOR) if item)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation is str:
        return text
    raise TypeError(f"unsupported option type {annotation!r}")


def _check_value(value: Any, annotation: Any) -> bool:
    """Whether an already-typed ``value`` (from Python or YAML) fits ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_value(value, option) for option in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@dataclasses.dataclass(frozen=True)
class OptionsConfig:
    """Base of every option dataclass: typed fields, each with ``metadata={"help": ...}``."""

    #: Keys that belong to TrainingArguments, mapped to the flag that sets them (refused in optim_args).
    reserved_keys: ClassVar[dict[str, str]] = {}
    #: What the options configure, for error messages (e.g. ``optim="lamb"``).
    subject: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # YAML gives lists; the dataclass is frozen and hashable
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not _check_value(value, hints[f.name]):
                raise OptionsError(
                    f"{self.subject}: option '{f.name}' must be {_describe_type(hints[f.name])}, got {value!r}.\n"
                    + self.describe()
                )

    @classmethod
    def describe(cls) -> str:
        """One line per valid key: name, type, default, help."""
        hints = typing.get_type_hints(cls)
        lines = [f"Valid keys for {cls.subject}:"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, tuple):
                default = LIST_SEPARATOR.join(default)
            lines.append(
                f"  {f.name} ({_describe_type(hints[f.name])}, default {default}): {f.metadata.get('help', '')}"
            )
        return "\n".join(lines)

    @classmethod
    def from_strings(cls, options: dict[str, str]) -> OptionsConfig:
        """Parse string values (as ``optim_args`` gives them) into a validated instance."""
        cls._check_keys(options)
        hints = typing.get_type_hints(cls)
        parsed: dict[str, Any] = {}
        for key, text in options.items():
            try:
                parsed[key] = _convert(text, hints[key])
            except ValueError:
                raise OptionsError(
                    f"{cls.subject}: option '{key}' must be {_describe_type(hints[key])}, got {text!r}.\n"
                    + cls.describe()
                ) from None
        return cls(**parsed)

    @classmethod
    def from_optim_args(cls, text: str | None) -> OptionsConfig:
        """Parse ``"a=1,b=2"``, split exactly as transformers splits ``optim_args`` (spaces dropped)."""
        options: dict[str, str] = {}
        for item in (text or "").replace(" ", "").split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key or "=" in value:
                raise OptionsError(
                    f"{cls.subject}: optim_args item {item!r} is not of the form key=value (items are separated "
                    f"by ',', list values by '{LIST_SEPARATOR}').\n{cls.describe()}"
                )
            if key in options:
                raise OptionsError(
                    f"{cls.subject}: optim_args gives option '{key}' twice ({key}={options[key]} and {item}); give "
                    f"it once.\n{cls.describe()}"
                )
            options[key] = value
        return cls.from_strings(options)

    @classmethod
    def from_mapping(cls, options: dict[str, Any]) -> OptionsConfig:
        """Build from already-typed values (Python or YAML); unknown keys raise :class:`OptionsError`."""
        cls._check_keys(options)
        return cls(**options)

    @classmethod
    def _check_keys(cls, keys: typing.Iterable[str]) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in keys:
            if key in cls.reserved_keys:
                raise OptionsError(
                    f"{cls.subject}: '{key}' is set by {cls.reserved_keys[key]}, not here.\n{cls.describe()}"
                )
            if key not in names:
                raise OptionsError(f"{cls.subject}: unknown option '{key}'.\n{cls.describe()}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

