"""Option values checked and converted by the dataclass field types that declare them, so an option
is validated where it is declared: `bool`, `int`, `float`, `str`, `None`, enums (a member or its
string), `Literal[...]`, unions of these, `tuple[X, ...]` (a list, or a lone string for strings;
a mapping for pairs), `tuple[A, B]` and `Annotated[str, P]` (a string P.parse accepts, kept as
str(P.parse(value)): structured names such as formats stay plain strings in options and saves). A field's `metadata={"check": (predicate, "what it must
be")}` adds a range check. Errors name the option and the expected type or values."""
from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping

_NONE = type(None)


def check_fields(obj) -> None:
    """Convert and check every field of a frozen dataclass instance in place (its __post_init__)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = convert(f.name, getattr(obj, f.name), hints[f.name])
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ValueError(f"option {f.name!r} must be {check[1]}, got {_shown(value)}")
        object.__setattr__(obj, f.name, value)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def convert(key: str, value, hint):
    """`value` as the type `hint` declares, or a ValueError naming `key` and what it must be."""
    options = _enumerable(hint)
    for arm in _arms(hint):
        try:
            return _convert_arm(key, value, arm)
        except _Mismatch:
            continue
    if options is not None:
        raise ValueError(f"invalid value {value!r} for segquant option {key!r}; valid values: {_either(options)}")
    raise ValueError(f"option {key!r} must be {describe(hint)}, got {_shown(value)}")


class _Mismatch(Exception):
    """This arm of a union does not take the value (another may)."""


def _convert_arm(key, value, arm):
    origin, args = typing.get_origin(arm), typing.get_args(arm)
    if arm is _NONE:
        if value is None:
            return None
    elif origin is typing.Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
    elif isinstance(arm, type) and issubclass(arm, enum.Enum):
        if isinstance(value, str) and value in {m.value for m in arm}:
            return arm(value)
    elif origin is typing.Annotated:
        if isinstance(value, str):
            try:
                return str(args[1].parse(value))
            except ValueError:
                pass
    elif arm is bool:
        if isinstance(value, bool):
            return value
    elif arm is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif arm is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif arm is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _convert_items(key, value, args[0])
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(convert(key, v, a) for v, a in zip(value, args))
    else:
        raise TypeError(f"typed_fields: unsupported field type {arm!r} for {key!r}")
    raise _Mismatch


def _convert_items(key, value, item):
    """tuple[X, ...]: a list or tuple; a lone string when X is str; a mapping when X is a pair (the
    values named `key[name]` in errors, as a user writes them)."""
    pair = typing.get_origin(item) is tuple and len(typing.get_args(item)) == 2
    if isinstance(value, str) and not pair:
        value = (value,)
    if pair and isinstance(value, Mapping):
        value = list(value.items())
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _Mismatch
    out = []
    for v in value:
        if pair and isinstance(v, (list, tuple)) and len(v) == 2:
            name_type, value_type = typing.get_args(item)
            name = convert(key, str(v[0]) if isinstance(v[0], str) else v[0], name_type)
            out.append((name, convert(f"{key}[{v[0]!r}]", v[1], value_type)))
        elif pair:
            raise ValueError(f"option {key!r} must be {describe(tuple[item, ...])}, got {_shown(v)} in it")
        else:
            out.append(convert(key, v, item))
    return tuple(out)


def _arms(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        # bool before the numbers: True is an int to Python, never a number here
        return tuple(sorted(typing.get_args(hint), key=lambda a: a is not bool))
    return (hint,)


def _enumerable(hint) -> tuple | None:
    """Every value `hint` admits, when it admits a fixed set (enums, Literal, bool, None)."""
    out = []
    for arm in _arms(hint):
        if arm is _NONE:
            out.append(None)
        elif arm is bool:
            out.extend((True, False))
        elif typing.get_origin(arm) is typing.Literal:
            out.extend(typing.get_args(arm))
        elif isinstance(arm, type) and issubclass(arm, enum.Enum):
            out.extend(m.value for m in arm)
        else:
            return None
    return tuple(out)


def describe(hint) -> str:
    """What a value of this type is, in words."""
    options = _enumerable(hint)
    if options is not None:
        return _either(options)
    words = []
    for arm in _arms(hint):
        origin, args = typing.get_origin(arm), typing.get_args(arm)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            if args[0] is str:
                words.append("a string or a list of strings")
            elif typing.get_origin(args[0]) is tuple:
                words.append("a mapping of " + " to ".join(describe(a) for a in typing.get_args(args[0])))
            else:
                words.append(f"a list of ({describe(args[0])})")
        elif origin is typing.Annotated:
            words.append(args[1].DESCRIBED)
        elif origin is typing.Literal or (isinstance(arm, type) and issubclass(arm, enum.Enum)):
            words.append(_either(_enumerable(arm)))
        else:
            words.append({_NONE: "None", bool: "True or False", int: "an int", float: "a number",
                          str: "a string (a path or name)"}.get(arm, getattr(arm, "__name__", str(arm))))
    return _either_words(words)


def _either(values) -> str:
    return _either_words([repr(v) for v in values])


def _either_words(words) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"
