"""The door's one rule for text that can reach the database, used by every servicer.

Why here and not in the database layer: PostgreSQL refuses a string holding NUL (0x00) ("A string
literal cannot contain NUL characters") while SQLite stores it, so a row that was answered OK on
PostgreSQL could only fail later, in the prediction log's writer or replay, after the caller was told
it succeeded. Refusing at the door, for the strictest backend, keeps both backends the same and keeps
bad rows out of the log and its spill file. Other bytes PostgreSQL refuses in text (invalid UTF-8,
lone surrogates) cannot get this far: protobuf refuses to decode a `string` field holding them
(gateway.api.wire answers INVALID_ARGUMENT). Header values (the audit actor) are filtered by
gateway.api.auth.

Also here: the bound on what an error message echoes back (a 100 KB model name is not repeated to
its sender, nor written whole into the log), and the fixed text of INTERNAL errors (the exception's
own text stays in the server log under a correlation id; it can carry SQL, paths or other callers'
data)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any

from registry import ValidationError

log = logging.getLogger(__name__)

REFUSED_CHARS = ("\x00",)  # characters some backend refuses in text (PostgreSQL: NUL)
MAX_DETAIL_CHARS = 512  # longest error message sent to a caller
MAX_NAME_CHARS = 256  # model, routing key and feature names longer than this are refused by name
MAX_ECHO_CHARS = 64  # how much of a refused value a message quotes
_routing_key, _request_id = attrgetter("routing_key"), attrgetter("request_id")
_model, _features = attrgetter("model"), attrgetter("features")


def _refused(value: str) -> str | None:
    for ch in REFUSED_CHARS:
        if ch in value:
            return ch
    return None


def _describe(ch: str) -> str:
    return f"contains U+{ord(ch):04X} ({'NUL' if ch == chr(0) else 'control character'}), which the " \
           "registry database refuses in text"


def check_text(field: str, value: str, max_chars: int | None = None) -> None:
    """Raise ValidationError (INVALID_ARGUMENT) naming `field` when `value` holds a character some
    backend refuses, or is longer than `max_chars`."""
    ch = _refused(value)
    if ch is not None:
        raise ValidationError(f"{field}: {_describe(ch)}")
    if max_chars is not None and len(value) > max_chars:
        raise ValidationError(f"{field}: {len(value)} characters, limit {max_chars}")


def check_texts(field: str, values: Iterable[str]) -> None:
    """`check_text` over many values (e.g. a packed batch's request ids) at the cost of one join and
    one scan in the usual case; the slow path names the first bad index (`field[i]`)."""
    values = values if isinstance(values, list | tuple) else list(values)
    joined = "".join(values)
    if _refused(joined) is None:
        return
    for i, v in enumerate(values):
        check_text(f"{field}[{i}]", v)


def check_request(request: object, prefix: str = "") -> None:
    """A chimera.v1.PredictRequest (alone, in a batch or in a stream): its ids, model and feature
    names. Lengths of ids are the predictor's (gateway.serving.rows); names are bounded here. It runs
    for every unary and stream row, so the usual case is one concatenation and one scan; the per-field
    checks, which name the field at fault, run only when that finds something."""
    model, rid, key = request.model, request.request_id, request.routing_key  # type: ignore[attr-defined]
    if len(model) > MAX_NAME_CHARS or _refused(model + rid + key) is not None:
        check_text(f"{prefix}model", model, MAX_NAME_CHARS)
        check_text(f"{prefix}request_id", rid)
        check_text(f"{prefix}routing_key", key)
    features = request.features  # type: ignore[attr-defined]
    if features:
        names = list(features.keys())
        if _refused("".join(names)) is not None or max(map(len, names)) > MAX_NAME_CHARS:
            for name in names:
                check_text(f"{prefix}features[{shorten(name)!r}]", name, MAX_NAME_CHARS)


def check_rows(rows: Sequence[Any], prefix: str = "rows") -> tuple[list[str], list[str]]:
    """`check_request` for every row of a batch, at the cost of one join over the batch in the usual
    case (the per-row walk, which names the first bad row, only runs when something is wrong).
    Returns the rows' (routing keys, request ids), read out of protobuf once here so the predictor
    does not read them again."""
    keys = list(map(_routing_key, rows))
    ids = list(map(_request_id, rows))
    models = list(map(_model, rows))
    names = [k for features in map(_features, rows) if features for k in features]
    joined = "".join(ids) + "".join(keys) + "".join(models) + "".join(names)
    if (_refused(joined) is None and max(map(len, names), default=0) <= MAX_NAME_CHARS
            and max(map(len, models), default=0) <= MAX_NAME_CHARS):
        return keys, ids
    for i, row in enumerate(rows):
        check_request(row, f"{prefix}[{i}].")
    return keys, ids  # not reached: the walk above raises on what the join found


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def detail(text: str) -> str:
    """An error message as sent to a caller: at most MAX_DETAIL_CHARS characters."""
    return shorten(text, MAX_DETAIL_CHARS)


def internal_detail(where: str, exc: BaseException) -> str:
    """Log `exc` with a fresh correlation id and return the fixed message a caller gets instead of
    the exception's text."""
    cid = uuid.uuid4().hex[:16]
    log.error("%s failed (correlation id %s)", where, cid, exc_info=exc)
    return f"internal error (correlation id {cid}; the gateway's log has the details)"
