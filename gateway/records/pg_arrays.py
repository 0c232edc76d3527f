"""PostgreSQL parameters of the prediction log's unnest inserts (gateway.records.inserter): each column of
a batch as ONE array literal built with str.join (issue 17: ~4 us a row of client CPU less than
execute_values' per-row mogrify, and less server CPU than parsing a 1000-row VALUES list), and the
packed feature vectors as one bytea with start and length arrays (`bytea_blob`). Split from the inserter
so each module stays short; values only ever travel as literals psycopg2 quotes, never as SQL."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from registry.models import list_to_packed


def pg_arrays(rows: Sequence[tuple[Any, ...]], text_columns: frozenset[int],
              bytea_column: int | None = None) -> tuple[Any, ...]:
    """The parameters of the unnest insert: one PostgreSQL array literal per column of `rows` (text
    quoted for `text_columns`, numbers printed for the others), except
    `bytea_column`, which becomes three (`bytea_blob`): the blob goes first (it comes first in the
    statement), its start and length arrays take the column's place."""
    params: list[Any] = []
    blob: Any = None
    for i, col in enumerate(zip(*rows, strict=True)):
        if i == bytea_column:
            blob, starts, lengths = bytea_blob(col)
            params += (starts, lengths)
        else:
            params.append(_text_array(col) if i in text_columns else _number_array(col))
    return tuple(params) if bytea_column is None else (blob, *params)


def bytea_blob(values: Sequence[Any]) -> tuple[Any, str, str]:
    """A bytea column as (one bytea holding every value end to end, 1-based start of each value, its
    length or NULL) for `substr(blob, start, length)` in the statement.

    Why not a bytea[] of hex elements: PostgreSQL's array parser scans each element character by
    character, ~4.2 us a row for 32 packed features (262 characters), most of the server's cost of
    parsing a batch; one bytea literal and two int arrays cost ~1.3 us (measured, 5,000-row
    statements). JSON text (a unary row's list, a replayed spill line) is packed first, so the column
    holds one form."""
    import psycopg2

    if not all(type(v) is bytes for v in values):  # the usual batch is matrix_f32's rows: no loop here
        values = [list_to_packed(v) for v in values]
    if None in values:
        lengths = [None if v is None else len(v) for v in values]
        data = b"".join([v for v in values if v is not None])
    else:
        lengths = list(map(len, values))
        data = b"".join(values)
    starts = list(accumulate((n or 0 for n in lengths[:-1]), initial=1))
    return psycopg2.Binary(data), _number_array(starts), _number_array(lengths)


def _text_array(values: Sequence[Any]) -> str:
    """'{"a","b",NULL}': every element quoted; backslash and double quote escaped where present. A NUL
    stays in the text, and psycopg2 refuses it with ValueError (a data error: the row is bisected out)."""
    if None not in values:
        try:
            text = '{"' + '","'.join(values) + '"}'
        except TypeError:  # a non-string value: the general form below
            pass
        else:
            if "\\" not in text and text.count('"') == 2 * len(values):
                return text
    return "{" + ",".join("NULL" if v is None else _quote(str(v)) for v in values) + "}"


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number_array(values: Sequence[Any]) -> str:
    """'{1,2.5,NULL,nan}': str() of each value (Python and numpy numbers print what PostgreSQL parses;
    repr() of a numpy scalar would not), None as NULL."""
    if None in values:
        return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"
    return "{" + ",".join(map(str, values)) + "}"
