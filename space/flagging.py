"""Flags from the UI: turn the flag panel's inputs (or a thumbs click) into a saved FlagRecord."""

from __future__ import annotations

import hashlib

from pydantic import ValidationError

from feedback.store import FlagStore
from schemas.errors import describe
from schemas.flag import REASONS, FlagRecord
from space.chat import Conversation

APP_VERSION = "0.1.0"


class FlagInputError(ValueError):
    """A flag the app will not save; the text says why, for the user."""


def flag_id_for(conversation_id: str, answer_index: int) -> str:
    """A flag's id is stable per answer: saving the same answer again revises the same flag."""
    return hashlib.sha256(f"{conversation_id}:{answer_index}".encode()).hexdigest()[:24]


def answer_label(index: int, text: str, width: int = 60) -> str:
    preview = " ".join(text.split())
    if len(preview) > width:
        preview = preview[: width - 1] + "…"
    return f"#{index} · {preview}"


def existing_flag(store: FlagStore, conv: Conversation, answer_index: int) -> FlagRecord | None:
    return store.get(flag_id_for(conv.conversation_id, answer_index))


def build_flag(
    conv: Conversation,
    answer_index: int | None,
    *,
    thumbs: str | None,
    reasons: list[str] | None,
    comment: str | None,
    correction: str | None,
    max_chars: int,
) -> FlagRecord:
    """The FlagRecord for one answer of ``conv``; FlagInputError says what is wrong with the input."""
    if answer_index is None or answer_index not in conv.answers or answer_index >= len(conv.messages):
        which = "" if answer_index is None else f" #{answer_index}"
        raise FlagInputError(f"Pick an answer to flag first: there is no answer{which} in this conversation.")
    unknown = [r for r in reasons or [] if r not in REASONS]
    if unknown:
        raise FlagInputError(f"Unknown reason(s) {unknown}: choose from {', '.join(REASONS)}.")
    for name, text in (("comment", comment), ("correction", correction)):
        if text and len(text) > max_chars:
            raise FlagInputError(
                f"The {name} is {len(text):,} characters long and the limit is {max_chars:,}: shorten it."
            )
    answer = conv.messages[answer_index]
    if correction is not None and (not correction.strip() or correction == answer.content):
        correction = None  # the prefilled answer, unedited, is not a correction
    ctx = conv.answers[answer_index]
    try:
        return FlagRecord(
            flag_id=flag_id_for(conv.conversation_id, answer_index),
            session_id=conv.session_id,
            conversation_id=conv.conversation_id,
            app_version=APP_VERSION,
            model=ctx.model,
            generation=ctx.generation,
            system_prompt=ctx.system_prompt,
            conversation=conv.messages[: answer_index + 1],
            thumbs=thumbs or None,
            reasons=reasons or [],
            comment=comment or "",
            correction=correction,
        )
    except ValidationError as err:
        raise FlagInputError(f"Flag not saved: {describe(err)}.") from None


def save_message(saved: FlagRecord, previous: FlagRecord | None) -> str:
    """The confirmation a user sees after saving."""
    n = len(saved.conversation) - 1
    if previous is not None and previous.record_id == saved.record_id:
        return f"✅ Flag on answer #{n} is already saved (revision {saved.revision}, id `{saved.flag_id}`); nothing changed."
    if saved.revision == 1:
        return f"✅ Saved: flag on answer #{n} (revision 1) — id `{saved.flag_id}`."
    return f"✅ Updated (revision {saved.revision}): flag on answer #{n} — id `{saved.flag_id}`."
