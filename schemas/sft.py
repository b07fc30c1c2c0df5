"""Training rows made from reviewed flags: SFT prompt-completion, preference pairs, KTO labels.

All in TRL's conversational shape, so `datasets.Dataset.from_list(rows)` feeds SFTTrainer,
DPOTrainer and KTOTrainer as is (the extra ``meta`` column is dropped before training).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.flag import ChatMessage, _Record

SFT_SCHEMA_VERSION = 1


class RowMeta(_Record):
    """Where a row came from, so a run's data can be traced back to flags and decisions."""

    source: Literal["correction", "replay", "thumbs"] = Field(
        description="correction: an accepted correction; replay: general behaviour to keep; thumbs: a user's "
        "thumbs up/down on the answer itself (KTO rows only)"
    )
    flag_id: str | None = Field(None, description="the flag whose accepted correction made this row")
    decision_id: str | None = Field(None, description="the accepting ReviewDecision")
    split: Literal["train", "heldout"] = "train"
    key: str = Field(description="stable hash of (prompt, completion); deduplication and the split use it")


class SFTRow(_Record):
    """Conversational prompt-completion: loss on the completion only."""

    schema_version: Literal[1] = SFT_SCHEMA_VERSION
    prompt: list[ChatMessage] = Field(min_length=1, description="system prompt + turns up to the flagged answer")
    completion: list[ChatMessage] = Field(min_length=1, max_length=1, description="one assistant turn")
    meta: RowMeta


class PreferenceRow(_Record):
    """DPO pair: chosen = the accepted correction, rejected = the model's original answer."""

    schema_version: Literal[1] = SFT_SCHEMA_VERSION
    prompt: list[ChatMessage] = Field(min_length=1)
    chosen: list[ChatMessage] = Field(min_length=1, max_length=1)
    rejected: list[ChatMessage] = Field(min_length=1, max_length=1)
    meta: RowMeta


class KTORow(_Record):
    """KTO example: an answer and whether it was desirable (thumbs up, or an accepted correction)."""

    schema_version: Literal[1] = SFT_SCHEMA_VERSION
    prompt: list[ChatMessage] = Field(min_length=1)
    completion: list[ChatMessage] = Field(min_length=1, max_length=1)
    label: bool
    meta: RowMeta
