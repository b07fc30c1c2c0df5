"""PullState: how far a feedback folder was brought up to date from its Hub dataset repo (`hub_pull.json`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.flag import _Record

PULL_SCHEMA_VERSION = 1


class PulledShard(_Record):
    """One shard folder of the dataset repo (`flags/<stem>` or `reviews/<stem>`) as the last pull found it."""

    tree: str = Field(description="the Hub's tree id of the shard's folder: unchanged means no new part")
    bytes: int = Field(ge=0, description="bytes [0, bytes) of the local shard are the Hub's parts")


class PullState(_Record):
    """The last complete pull of a feedback folder from its dataset repo, and the last attempt's outcome.

    Written atomically by `feedback.pull` after every attempt; only a pull that wrote every shard
    moves `commit`, so a pull cut short (a crash, the Hub going away) is completed by the next one.
    """

    schema_version: Literal[1] = PULL_SCHEMA_VERSION
    repo: str = Field(description="the dataset repo 'owner/name'")
    commit: str | None = Field(None, description="the dataset repo's commit the folder holds everything of")
    pulled_at: datetime | None = Field(None, description="when that pull completed")
    shards: dict[str, PulledShard] = Field(default_factory=dict, description="'flags/<stem>' -> what the Hub had")
    attempted_at: datetime | None = Field(None, description="when the last pull was tried")
    error: str | None = Field(None, description="why the last attempt failed; None when it succeeded")
