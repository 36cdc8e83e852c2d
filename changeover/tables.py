"""Typed reading of TOML tables, with errors that name the file, the key and what was expected.

Every section loader (core config, [migrations], [checks], [monitor]...) reads its table through
`Table`, so all config errors look alike and unknown keys (typos) are caught everywhere.
"""

from __future__ import annotations

import builtins
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from changeover.errors import ConfigError

T = TypeVar("T")

_MISSING: Any = object()
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """'500ms', '30s', '2m', '1h' or a plain number of seconds -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration >= 0")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError("a duration like '500ms', '30s', '2m' or '1h'")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _kind(value: object) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


@dataclass
class Table:
    """One TOML table and where it came from. Read keys with the typed getters, then `finish()`."""

    file: builtins.str
    path: builtins.str
    data: dict[builtins.str, Any]
    _seen: set[builtins.str] = field(default_factory=set)

    # -- errors -------------------------------------------------------------------------------
    def key_name(self, key: builtins.str) -> builtins.str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: builtins.str, expected: builtins.str, got: object = _MISSING) -> ConfigError:
        msg = f"expected {expected}"
        if got is not _MISSING:
            msg += f", got {_kind(got)} {got!r}" if not isinstance(got, dict | list) else f", got {_kind(got)}"
        return ConfigError(msg, file=self.file, key=self.key_name(key))

    # -- generic ------------------------------------------------------------------------------
    def has(self, key: builtins.str) -> builtins.bool:
        return key in self.data

    def raw(self, key: builtins.str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError("is required", file=self.file, key=self.key_name(key))
            return default
        return self.data[key]

    def keys(self) -> Iterator[builtins.str]:
        return iter(self.data)

    # -- typed getters ------------------------------------------------------------------------
    def str(self, key: builtins.str, default: Any = _MISSING, *, choices: tuple[builtins.str, ...] = ()) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if not isinstance(v, builtins.str):
            raise self.error(key, "a string", v)
        if choices and v not in choices:
            raise self.error(key, "one of " + ", ".join(repr(c) for c in choices), v)
        return v

    def int(self, key: builtins.str, default: Any = _MISSING, *, min: builtins.int | None = None,
            max: builtins.int | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if isinstance(v, builtins.bool) or not isinstance(v, builtins.int):
            raise self.error(key, "an integer", v)
        if (min is not None and v < min) or (max is not None and v > max):
            lo = "" if min is None else f">= {min}"
            hi = "" if max is None else f"<= {max}"
            raise self.error(key, "an integer " + " and ".join(p for p in (lo, hi) if p), v)
        return v

    def float(self, key: builtins.str, default: Any = _MISSING, *, min: builtins.float | None = None,
              max: builtins.float | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if isinstance(v, builtins.bool) or not isinstance(v, builtins.int | builtins.float):
            raise self.error(key, "a number", v)
        if (min is not None and v < min) or (max is not None and v > max):
            raise self.error(key, f"a number between {min} and {max}", v)
        return float(v)

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if not isinstance(v, builtins.bool):
            raise self.error(key, "true or false", v)
        return v

    def duration(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """Seconds as float, from '500ms' / '30s' / '2m' / '1h' or a number of seconds."""
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if not isinstance(v, builtins.str | builtins.int | builtins.float) or isinstance(v, builtins.bool):
            raise self.error(key, "a duration like '30s'", v)
        try:
            return parse_duration(v)
        except ValueError as e:
            raise self.error(key, str(e), v) from None

    def str_list(self, key: builtins.str, default: Any = _MISSING, *, nonempty: builtins.bool = False) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if not isinstance(v, list) or not all(isinstance(x, builtins.str) for x in v):
            raise self.error(key, "a list of strings", v)
        if nonempty and not v:
            raise self.error(key, "a non-empty list of strings", v)
        return list(v)

    def str_map(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """A table of string values (numbers and booleans are accepted and turned into strings)."""
        v = self.raw(key, default)
        if v is default and key not in self.data:
            return v
        if not isinstance(v, dict):
            raise self.error(key, "a table of strings", v)
        out: dict[builtins.str, builtins.str] = {}
        for k, x in v.items():
            if isinstance(x, builtins.bool):
                out[k] = "true" if x else "false"
            elif isinstance(x, builtins.str | builtins.int | builtins.float):
                out[k] = str(x)
            else:
                raise ConfigError(f"expected a string, got {_kind(x)}", file=self.file,
                                  key=f"{self.key_name(key)}.{k}")
        return out

    def table(self, key: builtins.str) -> Table:
        """A sub-table; an empty one when the key is absent."""
        v = self.raw(key, {})
        if not isinstance(v, dict):
            raise self.error(key, "a table", v)
        return Table(self.file, self.key_name(key), v)

    def tables(self, key: builtins.str) -> list[Table]:
        """An array of tables ([[key]]); empty when absent."""
        v = self.raw(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.error(key, f"an array of tables ([[{self.key_name(key)}]])", v)
        return [Table(self.file, f"{self.key_name(key)}[{i}]", x) for i, x in enumerate(v)]

    def finish(self) -> None:
        """Reject keys nobody read: a typo must not silently fall back to a default."""
        for key in self.data:
            if key not in self._seen:
                close = difflib.get_close_matches(key, sorted(self._seen), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key{hint}", file=self.file, key=self.key_name(key))
