"""Strict checks of single values at the door: whole numbers, finite numbers, true/false, text, folders.

Requests arrive as JSON (the API, job records, template.json files) or from the CLI, and plain
range comparisons let bad values through: ``True`` passes ``1 <= x <= 512`` (a bool is an int in
Python), ``1.5`` passes a range meant for whole numbers, and NaN passes any check written as
``if x < lo`` (every comparison with NaN is false). Each function here checks the type, then the
range, and raises :class:`~studio.errors.InputError` with one line naming the setting, what is
allowed and what was given.

Whole numbers also accept a float without a fractional part (``300.0``): JavaScript clients and
some JSON encoders send those for integers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from studio.errors import InputError

# Seeds are unsigned 32-bit: every RNG in the stack (torch, numpy, the UI's random seed) accepts them.
MAX_SEED = 2**32 - 1


def shown(value: Any, limit: int = 40) -> str:
    """A short printable form of a bad value for a message (long strings and lists are cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(x: float) -> str:
    """A bound as people write it: 512, 0.5, 1e-05."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def strict_int(value: Any, name: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
    """``value`` as an int in ``[lo, hi]``; None passes when ``optional``. Bools, strings and
    fractional or non-finite floats are refused."""
    if value is None and optional:
        return None
    whole = None
    if isinstance(value, int) and not isinstance(value, bool):
        whole = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        whole = int(value)
    if whole is None or not lo <= whole <= hi:
        raise InputError(f"{name} must be a whole number from {lo} to {hi} (got {shown(value)})")
    return whole


def finite_float(value: Any, name: str, lo: float, hi: float, *, optional: bool = False,
                 lo_open: bool = False, hi_open: bool = False) -> float | None:
    """``value`` as a finite float in the range ``lo..hi`` (``lo_open`` / ``hi_open``: that end excluded);
    None passes when ``optional``. Bools, strings, NaN and infinities are refused."""
    if value is None and optional:
        return None
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = None
    ok = number is not None and math.isfinite(number)
    if ok:
        ok = (lo < number if lo_open else lo <= number) and (number < hi if hi_open else number <= hi)
    if not ok:
        low = f"more than {_number(lo)}" if lo_open else f"at least {_number(lo)}"
        high = f"less than {_number(hi)}" if hi_open else f"at most {_number(hi)}"
        raise InputError(f"{name} must be a number {low} and {high} (got {shown(value)})")
    return number


def boolean(value: Any, name: str, *, optional: bool = False) -> bool | None:
    """``value`` if it is exactly true or false (not 1, "yes" or "false"); None passes when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false (got {shown(value)})")
    return value


def text(value: Any, name: str, *, optional: bool = False, max_chars: int | None = None,
         choices: Iterable[str] | None = None) -> str | None:
    """``value`` if it is a string (of at most ``max_chars``, one of ``choices``); None passes when ``optional``."""
    if value is None and optional:
        return None
    options = tuple(choices) if choices is not None else None
    if not isinstance(value, str) or (options is not None and value not in options):
        allowed = f"one of {', '.join(options)}" if options is not None else "a text"
        raise InputError(f"{name} must be {allowed} (got {shown(value)})")
    if max_chars is not None and len(value) > max_chars:
        raise InputError(f"{name} is too long ({len(value)} characters; the limit is {max_chars})")
    return value


def json_object(value: Any, what: str = "options", example: str = '{"seed": 1}') -> dict:
    """A copy of ``value`` if it is a JSON object (dict); None gives {}. A list or a string is refused
    instead of being ignored (which would silently run the defaults)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object such as {example}, not {type(value).__name__} "
                         f"{shown(value)}")
    return dict(value)


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and make sure a file can be written into it, before any work starts;
    InputError with the path and the reason otherwise (not an OSError traceback at the end of a run)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"cannot use {str(folder)!r} as the {what}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe file: permissions (also for root), read-only mounts and pseudo file systems such as /proc.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot use {str(folder)!r} as the {what}: {exc.strerror or exc}") from None
    return folder
