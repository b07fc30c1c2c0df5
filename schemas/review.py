"""ReviewDecision: a reviewer's verdict on one flag; never edits the flag, the latest decision wins."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from schemas.flag import Text, _Record, utcnow

REVIEW_SCHEMA_VERSION = 1


class ReviewDecision(_Record):
    """Accept or reject a flag's correction, optionally with the reviewer's edited correction."""

    schema_version: Literal[1] = REVIEW_SCHEMA_VERSION
    decision_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    flag_id: str = Field(min_length=1, description="the flag decided on")
    flag_record_id: str = Field(min_length=1, description="the flag revision the reviewer saw")
    action: Literal["accept", "reject"]
    correction: Text | None = Field(
        None, description="the reviewer's edited correction; None keeps the flag's own"
    )
    note: Text = ""
    reviewer: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _edit_only_when_accepting(self) -> "ReviewDecision":
        if self.action == "reject" and self.correction is not None:
            raise ValueError("a rejected flag has no correction: drop the edited correction or accept it")
        if self.correction is not None and not self.correction.strip():
            raise ValueError("an edited correction cannot be empty")
        return self
