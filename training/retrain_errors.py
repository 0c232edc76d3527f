"""Retraining's errors, in their own module so every retraining step can raise them without importing
the orchestration (training.retrain) that catches and records them."""

from __future__ import annotations


class RetrainError(Exception):
    """The retrain cannot run as asked (no production version, too little feedback, ...)."""


class RetrainBusy(RetrainError):
    """Another process is retraining this model right now (advisory lock held)."""


class LoadTestFailed(RetrainError):
    """The candidate's load test could not run (gateway unreachable, version never visible, no token)."""
