"""The one rule for floats that must become JSON: NaN and ±inf become None (JSON null).

Why it exists: JSON has no NaN or Infinity. Python's `json` writes them anyway (as the invalid tokens
`NaN` / `Infinity`), and PostgreSQL's json type then refuses the whole row. Statistics legitimately
produce NaN ("no data yet"), so every place that stores or prints them needs the same rule.

Where it is used: `registry.models.FiniteJSON` applies it to every JSON column on the way in, so code
that writes through the registry needs nothing; call `nan_to_none` directly only for JSON that does not
go through a column (reports written to files, `to_dict()` results, a float written to a Float column).

Ground floor (no project imports) so the pure decision policy can use it without pulling in the ORM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def nan_to_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively through mappings, lists and
    tuples (tuples become lists, as JSON would make them). NumPy scalars become Python numbers first
    (np.float32 and np.int64 are not JSON-serialisable). Keys and every other value are unchanged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        return nan_to_none(value.item())
    return value
