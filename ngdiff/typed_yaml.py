"""A mapping read from YAML, turned into (nested) dataclasses by their annotations.

Run configs (`ngdiff/config.py`) and study configs (`ngdiff/study/spec.py`) are both typed dataclasses
filled from YAML that a person wrote; one reader for both means one set of rules for what `1e-3`, `[1, 2]`,
`a,b` or a misspelt key become, and one shape of error: the file, the dotted key, what it must be, what it
got, and for an unknown key the keys its section does know.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from ngdiff.errors import UserError

CHECKED_LATER = "typed_yaml.checked_later"
"""Field metadata key: the value is kept as written and its type checked by the caller's own validation
(where that check already names the key in a message of its own)."""


def checked_later() -> dict[str, bool]:
    """`dataclasses.field(metadata=checked_later())`: this field's type is checked after parsing."""
    return {CHECKED_LATER: True}


@dataclass(frozen=True)
class TypedYaml:
    """Where the mapping came from (`source`: a file or "command line"), which error a caller's users see,
    and what an unknown key is called in it ("config key", "key")."""

    source: str
    error: type[Exception] = UserError
    noun: str = "key"

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{self.source}: {message}")

    def section(self, cls: type, raw: Any, path: str = "") -> Any:
        """`cls` filled from the mapping `raw` (the section at dotted `path`; "" for the top level): nested
        dataclass fields from nested mappings, every other field coerced by its annotation. An absent or
        empty (None) section is the defaults."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            self.fail(f"{path or 'the top level'} must be a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        self.check_keys(raw, fields, path)
        values = {}
        for name, value in raw.items():
            key = join(path, name)
            hint = hints[name]
            if fields[name].metadata.get(CHECKED_LATER):
                values[name] = value
            elif dataclasses.is_dataclass(hint):
                values[name] = self.section(hint, value, key)
            else:
                values[name] = self.value(value, hint, key)
        return cls(**values)

    def check_keys(self, raw: Mapping, known: Iterable[str], path: str = "") -> None:
        """Every key of `raw` is one of `known`; else an error naming it, its closest known key and all of them."""
        known = list(known)
        for name in raw:
            if name in known:
                continue
            guess = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {join(path, guess[0])}?)" if guess else ""
            where = f"of {path}" if path else "at the top level"
            self.fail(f"unknown {self.noun} {join(path, str(name))}{hint}; known keys {where}: {', '.join(known)}")

    def value(self, value: Any, hint: Any, key: str) -> Any:
        """`value` as the annotation `hint` says: bool, int, float (finite), str, Literal, tuple[X, ...],
        tuple[X, Y], X | None. A tuple also takes a comma-separated string (`a.jsonl,b.jsonl`)."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Literal:
            if value not in args:
                self.fail(f"{key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
            return value
        if origin is tuple:
            return self._tuple(value, args, key)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if len(inner) != 1 or len(args) != 2:
                raise TypeError(f"{key}: unsupported annotation {hint} (only X | None)")
            return None if value is None else self.value(value, inner[0], key)
        if hint is bool:
            if not isinstance(value, bool):
                self.fail(f"{key} must be true or false, got {value!r}")
            return value
        if hint is int:
            return self._int(value, key)
        if hint is float:
            return self._float(value, key)
        if hint is str:
            if isinstance(value, (dict, list, tuple)):
                self.fail(f"{key} must be a string, got {value!r}")
            return "" if value is None else str(value)
        raise TypeError(f"{key}: unsupported annotation {hint}")

    def _tuple(self, value: Any, args: tuple, key: str) -> tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            self.fail(f"{key} must be a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(self.value(v, args[0], key) for v in value)
        if len(value) != len(args):
            self.fail(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(self.value(v, hint, key) for v, hint in zip(value, args, strict=True))

    def _int(self, value: Any, key: str) -> int:
        # YAML 1.1 reads 1e3 (no dot) as a string: a whole number written so is still one
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = self._number(value)
        if number is None or not number.is_integer():
            self.fail(f"{key} must be an integer, got {value!r}")
        return int(number)

    def _float(self, value: Any, key: str) -> float:
        number = self._number(value)
        if number is None:
            self.fail(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at inf or nan: an lr of inf trains NaN weights
            self.fail(f"{key} must be a finite number, got {value!r}")
        return number

    @staticmethod
    def _number(value: Any) -> float | None:
        """A float from an int, a float or a numeric string (YAML 1.1 reads `1e-3` as one); else None."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None
        try:
            return float(value)
        except (ValueError, OverflowError):
            return None


def join(path: str, name: str) -> str:
    """The dotted key of `name` in the section at `path`."""
    return f"{path}.{name}" if path else name
