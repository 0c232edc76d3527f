"""The `training_runs` row of one retrain: its progress (to the caller at once, to the row throttled)
and its provenance (the code revision that ran it)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from chimera.settings import RetrainSettings
from registry import Registry
from registry.training_runs import update_run

ProgressFn = Callable[[float, str], None]


class RunProgress:
    """Reports progress to the caller and (throttled: a new stage, or 5 % more) to the run row."""

    def __init__(self, registry: Registry, run_id: int, callback: ProgressFn | None) -> None:
        self.registry, self.run_id, self.callback = registry, run_id, callback
        self._saved = (-1.0, "")

    def __call__(self, fraction: float, stage: str) -> None:
        if self.callback is not None:
            self.callback(fraction, stage)
        last_fraction, last_stage = self._saved
        if stage != last_stage or fraction - last_fraction >= 0.05:
            update_run(self.registry, self.run_id, progress=fraction, stage=stage)
            self._saved = (fraction, stage)


def code_revision(configured: str | None = None) -> str:
    """`configured` (default: chimera.settings' CHIMERA_CODE_REVISION, set in container images), else
    `git rev-parse HEAD` of this checkout with "+dirty" when it has local changes, else ""."""
    if configured is None:
        configured = RetrainSettings.from_env().code_revision
    if configured:
        return configured[:64]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return (head + ("+dirty" if dirty else ""))[:64]
