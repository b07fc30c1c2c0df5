"""A run folder's own records: ``state.json`` (how far the run got) and ``manifest.json`` (what it pinned).

Kept apart from ``retrain.pipeline`` so that readers of runs (``retrain.status``, the review page's
Retraining tab, which the Space ships) do not pull in the stages and their training imports.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from schemas.run import RunManifest, RunState


def read_state(run_dir: Path) -> RunState:
    """The run's state; a fresh one (nothing done) when it has no state.json yet."""
    path = run_dir / "state.json"
    if path.exists():
        return RunState.model_validate_json(path.read_text(encoding="utf-8"))
    return RunState(run_id=run_dir.name)


def write_state(run_dir: Path, state: RunState) -> RunState:
    """Stamp and write the run's state atomically (a reader sees the old or the new one, never half)."""
    state = state.model_copy(update={"updated_at": datetime.now(timezone.utc)})
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(state.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / "state.json")
    return state


def read_manifest(run_dir: Path) -> RunManifest:
    path = run_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the merge stage of this run first")
    return RunManifest.model_validate_json(path.read_text(encoding="utf-8"))
