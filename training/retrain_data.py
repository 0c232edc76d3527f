"""Retraining, step "dataset": which version is production, and the logged outcomes to learn from.

Production = the version with status "production", else the one with the most traffic. Feedback =
logged predictions with features and outcomes in [since, until), projected on the production schema;
rows scored by a version lacking a production feature are dropped (and counted, for the run's notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from registry import Registry, VersionInfo
from training.datasets import LABEL, TIMESTAMP
from training.feedback import feedback_frame, production_version
from training.retrain_errors import RetrainError


@dataclass(frozen=True)
class FeedbackData:
    """`feedback` keeps every column (the outcome too, for the outcome metric); `data` is what a
    candidate trains on (timestamp, the production features, label), row for row the same."""

    feedback: pd.DataFrame
    data: pd.DataFrame
    dropped: int


def resolve_production(registry: Registry, model: str) -> VersionInfo:
    prod = production_version(registry, model)
    if prod is None:
        raise RetrainError(f"model {model!r} has no production version and no traffic to compare against")
    return prod


def feedback_dataset(registry: Registry, model: str, features: list[str], *, since: datetime,
                     until: datetime, threshold: float) -> FeedbackData:
    fb = feedback_frame(registry, model, since=since, until=until, features=features, threshold=threshold)
    dropped = int(fb[features].isna().any(axis=1).sum()) if len(fb) else 0
    fb = fb.dropna(subset=features).reset_index(drop=True)
    return FeedbackData(fb, fb[[TIMESTAMP, *features, LABEL]], dropped)


def require_trainable(data: pd.DataFrame, *, min_rows: int, since: datetime, until: datetime) -> None:
    """RetrainError when the window holds too few rows, or a single label, to train on."""
    if len(data) < min_rows:
        raise RetrainError(f"feedback: {len(data)} rows with features and outcomes in the window "
                           f"{since.isoformat()} .. {until.isoformat()}, need at least {min_rows}")
    if data[LABEL].nunique() < 2:
        raise RetrainError("feedback: every outcome in the window has the same label")
