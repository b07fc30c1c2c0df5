"""FlagRecord: one user's verdict on one assistant answer, complete enough to act on months later."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

SCHEMA_VERSION = 1


class Reason(str, Enum):
    """The fixed taxonomy of what can be wrong with an answer."""

    incorrect = "incorrect"
    hallucinated = "hallucinated"
    unhelpful = "unhelpful"
    incomplete = "incomplete"
    unsafe = "unsafe"
    offensive = "offensive"
    formatting = "formatting"
    off_topic = "off-topic"
    other = "other"


REASONS: tuple[str, ...] = tuple(r.value for r in Reason)


def check_text(value: str) -> str:
    """Reject text that cannot be written as UTF-8 (lone surrogates from broken clients)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"text contains invalid unicode at position {err.start} "
            f"({value[err.start]!r}); send valid UTF-8 text"
        ) from None
    return value


class _ValidUTF8:
    """Marks a ``str`` field as ``Text``: checked by ``check_text`` when built from Python objects.

    JSON needs no such check: its parser already refuses a lone surrogate escape ("\\ud800") and
    bytes that are not UTF-8, so records read back from the shards skip a Python call per text
    field (900k of them in a 100k-flag merge).
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.json_or_python_schema(
            json_schema=handler(source),
            python_schema=core_schema.no_info_after_validator_function(check_text, handler(source)),
        )


Text = Annotated[str, _ValidUTF8]
"""Text that can be written as UTF-8 (see ``check_text``)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)


class ChatMessage(_Record):
    """One turn of a conversation, in the OpenAI/ChatML role-content shape."""

    role: Literal["system", "user", "assistant"]
    content: Text


class ModelIdentity(_Record):
    """Which model file answered: enough to fetch the exact same bytes again."""

    source: Literal["embedded", "local", "hub"]
    repo: str | None = Field(None, description="Hub repo id, when source is 'hub'")
    revision: str | None = Field(None, description="Hub commit sha, when source is 'hub'")
    path: str = Field(description="path of the GGUF file that was loaded")
    file: str = Field(description="file name of the GGUF")
    sha256: str = Field(description="sha256 of the GGUF file's bytes")
    quant: str = Field(description="quantization type, e.g. Q4_1")
    version: str | None = Field(None, description="model registry version that answered, if any")

    @model_validator(mode="wrap")
    @classmethod
    def _one_instance_per_identity(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo):
        # Every flag a model version answered names the same identity: read back, 100k flags held
        # 100k equal copies (1.2 KB each). Records are frozen, so equal JSON can share one instance.
        # JSON only: ModelIdentity(...) validates into the new object itself and must fill it.
        if info.mode != "json" or type(value) is not dict:
            return handler(value)
        try:
            key = (cls, *value.items())
            return _IDENTITIES[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value: not an identity; let validation say why
            return handler(value)
        identity = handler(value)
        if len(_IDENTITIES) < 64:
            _IDENTITIES[key] = identity
        return identity


_IDENTITIES: dict[tuple, ModelIdentity] = {}


class GenerationSettings(_Record):
    """The knobs the answer was sampled with."""

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    seed: int = Field(-1, ge=-1, description="-1 draws a random seed; records store the one used")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class FlagRecord(_Record):
    """A user's flag on one assistant answer (also a thumbs up/down alone).

    Records are append-only: saving the same answer again writes a new revision with the
    same ``flag_id``; readers keep the latest revision of each flag.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="unique per written line")
    flag_id: str = Field(description="stable id of the flagged answer within its session")
    revision: int = Field(1, ge=1, description="1 for the first save, +1 for each changed re-save")
    created_at: datetime = Field(default_factory=utcnow, description="when the flag was first saved")
    updated_at: datetime = Field(default_factory=utcnow, description="when this revision was saved")
    session_id: str = Field(min_length=1, description="the browser session that flagged")
    conversation_id: str = Field(min_length=1, description="the conversation; a new one after 'clear'")
    app_version: str
    model: ModelIdentity
    generation: GenerationSettings
    system_prompt: Text
    conversation: list[ChatMessage] = Field(
        min_length=1,
        description="the conversation (without the system prompt) up to and including the flagged answer, its last turn",
    )
    thumbs: Literal["up", "down"] | None = None
    reasons: list[Reason] = Field(default_factory=list)
    comment: Text = ""
    correction: Text | None = Field(None, description="the answer it should have given")

    @field_validator("reasons")
    @classmethod
    def _unique_reasons(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _last_turn_is_the_answer(self) -> "FlagRecord":
        if self.conversation[-1].role != "assistant":
            raise ValueError("the conversation must end with the flagged assistant answer")
        return self

    @property
    def answer(self) -> str:
        return self.conversation[-1].content

    def content_key(self) -> tuple:
        """What a user can change between saves; equal keys mean a re-save changes nothing."""
        return (self.thumbs, tuple(self.reasons), self.comment, self.correction)
