"""Declared schemas for the files Lesion Lab reads: each field, whether a file must hold it, and its check.

One mechanism for every format the app reads: the model files (``CHECKPOINT_SCHEMA`` and ``ENSEMBLE_SCHEMA`` in
:mod:`core.models`), the job file (``JOB_FILE_SCHEMA``), the run folder's JSON records (:mod:`core.common.runs`) and
the decoded-image cache's index (:mod:`core.data.decoded`). A field a closed schema does not list is refused; a JSON
file (:class:`JsonFormat`) is bounded in bytes before it is parsed and in depth and values before its fields are
looked at, so a hostile file costs at most its bound to refuse.

It imports only the leaf modules :mod:`core.common.formatting` and :mod:`core.common.labels`, so every layer may
use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from core.common.formatting import format_bytes
from core.common.labels import CLASSES, check_class_order

Check = Callable[[object], None]
# What a JSON file (or a model file's pickle, with its tensors) may hold below its dicts and lists.
PLAIN_VALUES: tuple[type, ...] = (str, int, float, bool, type(None))
# Temperatures outside [0.05, 20] mean the validation set is broken, not that the model needs them: the range the
# fit searches (core.metrics.calibration), and a file recording another is refused (1e-30 turns any logit gap into
# "100 %").
TEMPERATURE_RANGE = (0.05, 20.0)


class SchemaError(ValueError):
    """A value or a file that its schema refuses; the message names the field and what is allowed."""


class Field(NamedTuple):
    """One field of a schema: whether every payload has it, and its check (a ValueError naming the field)."""

    required: bool
    check: Check


def check_schema(payload: Mapping, schema: Mapping[str, Field], kind: str, *, closed: bool = True) -> None:
    """ValueError naming the first field of ``payload`` that is missing, out of its bounds or (``closed``) not in
    ``schema``; an open schema (a training config, whose fields grow) checks the fields it lists and lets the others
    by, bounded by :func:`check_structure`."""
    missing = [key for key, field in schema.items() if field.required and key not in payload]
    if missing:
        raise SchemaError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    unknown = sorted(map(repr, set(payload) - set(schema))) if closed else []
    if unknown:
        raise SchemaError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field of {kind}")
    for key, field in schema.items():
        if key in payload:
            field.check(payload[key])


def check_structure(
    value: object, what: str, *, max_depth: int, max_values: int, leaves: tuple[type, ...] = PLAIN_VALUES
) -> None:
    """SchemaError unless ``value`` is ``leaves`` in dicts, lists and tuples at most ``max_depth`` deep, with at most
    ``max_values`` values counted along every path (lists that share one another count each time they would be
    printed)."""
    pending, seen = [(value, 0)], 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if seen > max_values:
            raise SchemaError(f"{what} holds more than {max_values:,} values")
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise SchemaError(f"{what} nests deeper than {max_depth} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else list(item)
            # A pickle's BUILD may give a dict attributes (a state dict's _metadata): they are loaded too.
            children += list(getattr(item, "__dict__", {}).values())
            pending += [(child, depth + 1) for child in children]
        elif not isinstance(item, leaves):
            raise SchemaError(f"{what} holds a {type(item).__name__}, which a Lesion Lab file never does")


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool, a string or a tensor) that is neither NaN nor infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def is_whole(value: object, minimum: int, maximum: int | None = None) -> bool:
    """An int (not a bool) from ``minimum`` to ``maximum``."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )


def are_fractions(values: object) -> bool:
    """Three finite numbers from 0 summing to 1: a split's train, validation and test shares."""
    if not isinstance(values, list | tuple) or len(values) != 3 or not all(is_finite_number(v) for v in values):
        return False
    return all(v >= 0 for v in values) and math.isclose(sum(values), 1.0, rel_tol=1e-5, abs_tol=1e-8)


def one_of(key: str, allowed: Sequence[object]) -> Check:
    def check(value: object) -> None:
        if isinstance(value, dict | list) or value not in allowed:
            raise SchemaError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")

    return check


def whole(key: str, minimum: int, maximum: int | None = None, *, empty: bool = False) -> Check:
    """A whole number from ``minimum`` (to ``maximum``); None too when ``empty``."""

    def check(value: object) -> None:
        if not (empty and value is None) and not is_whole(value, minimum, maximum):
            upto = f" to {maximum}" if maximum is not None else ""
            raise SchemaError(
                f"{key} must be {'empty or ' if empty else ''}a whole number from {minimum}{upto}; got {value!r}"
            )

    return check


def number(key: str, low: float, high: float, *, empty: bool = False) -> Check:
    """A finite number from ``low`` to ``high``; None too when ``empty`` (a metric that is undefined)."""

    def check(value: object) -> None:
        if not (empty and value is None) and not (is_finite_number(value) and low <= value <= high):
            raise SchemaError(
                f"{key} must be {'empty or ' if empty else ''}a finite number from {low:g} to {high:g}; got {value!r}"
            )

    return check


def probability(key: str, *, empty: bool = False) -> Check:
    """A finite number from 0 to 1 (a rate, a threshold on a probability); None too when ``empty``."""

    def check(value: object) -> None:
        if not (empty and value is None) and not (is_finite_number(value) and 0 <= value <= 1):
            raise SchemaError(f"{key} must be {'empty or ' if empty else ''}a probability from 0 to 1; got {value!r}")

    return check


def class_list(key: str) -> Check:
    """The project's classes in the project's order (core.common.labels): rows and columns are indexed by it."""

    def check(value: object) -> None:
        if not isinstance(value, list | tuple):
            raise SchemaError(f"{key} must be the list {list(CLASSES)}; got {value!r}")
        try:
            check_class_order(value)
        except ValueError:
            raise SchemaError(f"{key} are in the order {list(value)}, not the project's {list(CLASSES)}") from None

    return check


def _of_type(key: str, kind: type, what: str, empty: bool) -> Check:
    def check(value: object) -> None:
        if not (empty and value is None) and not isinstance(value, kind):
            raise SchemaError(f"{key} must be {'empty or ' if empty else ''}{what}; got {type(value).__name__}")

    return check


def text(key: str, *, empty: bool = False) -> Check:
    """A string; None too when ``empty``."""
    return _of_type(key, str, "text", empty)


def flag(key: str) -> Check:
    def check(value: object) -> None:
        if not isinstance(value, bool):
            raise SchemaError(f"{key} must be true or false; got {value!r}")

    return check


def a_dict(key: str, *, empty: bool = False) -> Check:
    """A dict of any plain values (bounded by the file's structure); None too when ``empty``."""
    return _of_type(key, dict, "a dict", empty)


def list_of(key: str, item: Check, *, length: int | None = None, empty: bool = False) -> Check:
    """A list whose every item passes ``item`` (of exactly ``length`` items when given); None too when ``empty``."""

    def check(value: object) -> None:
        if empty and value is None:
            return
        if not isinstance(value, list) or length is not None and len(value) != length:
            size = f" of {length}" if length is not None else ""
            raise SchemaError(f"{key} must be a list{size}; got {type(value).__name__} {_brief(value)}")
        for entry in value:
            item(entry)

    return check


def record(key: str, schema: Mapping[str, Field], *, empty: bool = False) -> Check:
    """A dict checked against its own closed ``schema``, its refusals naming ``key``; None too when ``empty``."""

    def check(value: object) -> None:
        if empty and value is None:
            return
        if not isinstance(value, dict):
            raise SchemaError(f"{key} must be a dict; got {type(value).__name__}")
        try:
            check_schema(value, schema, key)
        except ValueError as exc:  # a field's name follows the record's; a list of unknown ones (quoted) does not
            raise SchemaError(f"{key}{': ' if str(exc).startswith(chr(39)) else '.'}{exc}") from None

    return check


def _brief(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


class JsonFormat(NamedTuple):
    """A JSON file the app reads: what it is called in messages, its bounds and its check of the whole payload (a
    ValueError naming the field), applied in this order by :func:`read_json_file`."""

    kind: str
    max_bytes: int
    max_depth: int
    max_values: int
    check: Check


def closed_schema(schema: Mapping[str, Field], kind: str) -> Check:
    """The check of a JSON object that holds only ``schema``'s fields."""

    def check(value: object) -> None:
        if not isinstance(value, dict):
            raise SchemaError(f"it holds a {type(value).__name__}, not an object of fields")
        check_schema(value, schema, kind)

    return check


def read_json_file(path: str | Path, fmt: JsonFormat) -> Any:
    """The payload of the JSON file ``path``, checked against ``fmt``: at most ``fmt.max_bytes`` read (a longer file is
    refused unparsed), then its nesting and value count, then ``fmt.check``. FileNotFoundError when it does not exist;
    :class:`SchemaError` naming the file and what is wrong otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(fmt.max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SchemaError(f"{path.name} cannot be read ({exc.strerror or exc})") from None
    if len(data) > fmt.max_bytes:
        raise SchemaError(f"{path.name} is larger than {fmt.kind} can be ({format_bytes(fmt.max_bytes)} at most)")
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SchemaError(f"{path.name} is not {fmt.kind} (not JSON)") from None
    except RecursionError:  # brackets nested past the parser's stack: far deeper than max_depth
        raise SchemaError(f"{path.name} is not {fmt.kind}: it nests deeper than {fmt.max_depth} levels") from None
    try:
        check_structure(payload, "it", max_depth=fmt.max_depth, max_values=fmt.max_values)
        fmt.check(payload)
    except ValueError as exc:
        raise SchemaError(f"{path.name} is not {fmt.kind}: {exc}") from None
    return payload
