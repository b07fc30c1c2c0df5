"""Sample FlagRecords for tests: realistic, and different for each call."""

from __future__ import annotations

import itertools

from schemas.flag import ChatMessage, FlagRecord, GenerationSettings, ModelIdentity

_n = itertools.count()

MODEL = ModelIdentity(
    source="embedded", path="/models/m.gguf", file="m.gguf", sha256="0" * 64, quant="Q4_1"
)


def make_flag(**overrides) -> FlagRecord:
    n = next(_n)
    fields = dict(
        flag_id=f"flag{n:06d}",
        session_id="session-a",
        conversation_id="conv-a",
        app_version="test",
        model=MODEL,
        generation=GenerationSettings(temperature=0.2, top_p=0.9, max_new_tokens=64, seed=n),
        system_prompt="You are a helpful assistant.",
        conversation=[
            ChatMessage(role="user", content=f"Question {n}: what is the capital of Xanadu?"),
            ChatMessage(role="assistant", content="It is Paris."),
        ],
        thumbs="down",
        reasons=["incorrect", "hallucinated"],
        comment=f"comment {n}",
        correction="The capital of Xanadu is Shangdu.",
    )
    fields.update(overrides)
    return FlagRecord(**fields)
