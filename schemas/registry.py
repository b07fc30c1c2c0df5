"""ModelVersion: one published model in the registry (local folder or Hub model repo)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.flag import _Record, utcnow

REGISTRY_SCHEMA_VERSION = 1


class GateReport(_Record):
    """Before vs after on held-out corrections and on drift prompts, and the verdict with its reason."""

    passed: bool
    reason: str
    heldout_before: float
    heldout_after: float
    drift: float = Field(description="rise of mean NLL/token of the base's own answers on drift prompts")
    drift_near: float | None = Field(None, description="the same, on the drift prompts nearest to the corrections")
    drift_worst: float | None = Field(None, description="the largest rise on any one drift prompt")
    heldout_answered: float | None = Field(
        None, description="share of held-out corrections the exported GGUF answers with their distinctive words"
    )
    unrelated_changed: float | None = Field(
        None, description="share of drift prompts the exported GGUF answers otherwise than a zero-LoRA export"
    )
    details: dict = Field(default_factory=dict)


class ModelVersion(_Record):
    """A published GGUF: what it is, what it came from, and why it was published."""

    schema_version: Literal[1] = REGISTRY_SCHEMA_VERSION
    version: str = Field(pattern=r"^v\d+$", description="v1, v2, ...")
    created_at: datetime = Field(default_factory=utcnow)
    file: str = Field(description="GGUF file name inside the version folder / repo")
    sha256: str
    bytes: int
    quant: str
    base_sha256: str = Field(description="sha256 of the serving GGUF the LoRA was trained on")
    run_id: str | None = None
    dataset_revision: str | None = None
    metrics: dict = Field(default_factory=dict)
    gate: GateReport | None = None
