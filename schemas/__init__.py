"""The records that cross flagloop's boundaries, one definition each, versioned."""

from schemas.flag import (
    REASONS,
    SCHEMA_VERSION,
    ChatMessage,
    FlagRecord,
    GenerationSettings,
    ModelIdentity,
    Reason,
)
from schemas.review import ReviewDecision

__all__ = [
    "REASONS",
    "SCHEMA_VERSION",
    "ChatMessage",
    "FlagRecord",
    "GenerationSettings",
    "ModelIdentity",
    "Reason",
    "ReviewDecision",
]
