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

__all__ = [
    "REASONS",
    "SCHEMA_VERSION",
    "ChatMessage",
    "FlagRecord",
    "GenerationSettings",
    "ModelIdentity",
    "Reason",
]
