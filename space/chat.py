"""Chat turns: check the user's message, fit the history into the context, stream the answer.

The llama model is not thread-safe, so one generation runs at a time (``Generator.lock``);
each browser session keeps its own ``Conversation``, so no user sees another's turns.
A new model version is swapped in under the same lock (``Generator.swap``), so it takes over
between two answers, and each answer reports the identity of the model that gave it.
"""

from __future__ import annotations

import queue
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from schemas.flag import ChatMessage, GenerationSettings, ModelIdentity, check_text

# Tokens the chat template adds around each message (<|im_start|>role\n ... <|im_end|>\n).
TEMPLATE_TOKENS_PER_MESSAGE = 8


class ChatInputError(ValueError):
    """A message the app will not send to the model; the text says why, for the user."""


@dataclass(frozen=True)
class AnswerContext:
    """What produced one assistant answer: stamped on any flag of that answer."""

    model: ModelIdentity
    generation: GenerationSettings  # with the seed actually used
    system_prompt: str


@dataclass
class Conversation:
    """One browser session's chat: its turns and what produced each answer."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[ChatMessage] = field(default_factory=list)
    answers: dict[int, AnswerContext] = field(default_factory=dict)  # message index -> context

    def clear(self) -> None:
        """Start a new conversation in the same session."""
        self.conversation_id = uuid.uuid4().hex
        self.messages = []
        self.answers = {}

    def answer_indices(self) -> list[int]:
        return [i for i in sorted(self.answers) if i < len(self.messages)]


def check_message(text: str | None, max_chars: int) -> str:
    """The message to send, or ChatInputError with what is wrong with it."""
    if text is None or not text.strip():
        raise ChatInputError("Type a message first: an empty message was not sent.")
    try:
        check_text(text)
    except ValueError as err:
        raise ChatInputError(f"Message not sent: {err}.") from None
    if len(text) > max_chars:
        raise ChatInputError(
            f"Message not sent: it is {len(text):,} characters long and the limit is {max_chars:,}. "
            "Shorten it or raise FLAGLOOP_MAX_MESSAGE_CHARS."
        )
    return text


def resolve_seed(settings: GenerationSettings) -> GenerationSettings:
    """Replace seed -1 with a drawn seed, so the record says which seed produced the answer."""
    if settings.seed >= 0:
        return settings
    return settings.model_copy(update={"seed": random.randrange(2**31)})


def fit_history(
    messages: list[dict], count_tokens, n_ctx: int, max_new_tokens: int
) -> list[dict]:
    """Drop the oldest turns (after the system prompt) until the prompt and answer fit in n_ctx."""
    def cost(m: dict) -> int:
        return count_tokens(m["content"]) + TEMPLATE_TOKENS_PER_MESSAGE

    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    budget = n_ctx - max_new_tokens - sum(cost(m) for m in system)
    kept: list[dict] = []
    for m in reversed(turns):
        budget -= cost(m)
        if budget < 0:
            break
        kept.append(m)
    kept.reverse()
    # Never start on an assistant turn: the model would answer without its question.
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    if not kept:
        raise ChatInputError(
            f"Message not sent: with the system prompt and {max_new_tokens} new tokens it does not fit "
            f"in the model's {n_ctx}-token context. Shorten it or lower max new tokens."
        )
    return system + kept


class Generator:
    """Streams answers from one llama model, one generation at a time; the model can be swapped between answers.

    Every call into llama.cpp runs on one dedicated thread (``model_thread``), whatever thread
    asks for the answer. Gradio steps a streaming handler in whichever worker thread is free, and
    each new thread that calls llama.cpp leaves another compute thread behind: measured with
    the embedded model on 2 cores, one answer from a second thread took every later answer from
    about 75 to 45-50 tokens/s (bench/chat_overhead.py, BENCHMARKS.md).
    """

    def __init__(self, llama, n_ctx: int, identity: ModelIdentity | None = None):
        self.llama = llama
        self.identity = identity
        self.n_ctx = n_ctx
        self.lock = threading.Lock()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

    def swap(self, llama, identity: ModelIdentity | None):
        """Serve `llama` from the next answer on; return the model it replaces.

        Waits for the answer in flight, which finishes on the old model. Nothing uses the
        returned model afterwards, so the caller may close it.
        """
        with self.lock:
            old, self.llama, self.identity = self.llama, llama, identity
        return old

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(
        self, messages: list[dict], settings: GenerationSettings,
        on_start: Callable[[ModelIdentity | None], None] | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text pieces as the model produces them (settings.seed must be >= 0).

        ``on_start`` is called with the identity of the model that will give this answer, once it
        holds the lock: a swap cannot come between that call and the answer. Closing the iterator
        early (a client went away) stops the generation at its next token.
        """
        with self.lock:
            if on_start is not None:
                on_start(self.identity)
            pieces: queue.Queue = queue.Queue()
            stop = threading.Event()
            job = self.model_thread.submit(self._generate, messages, settings, pieces, stop)
            try:
                while (piece := pieces.get()) is not _DONE:
                    yield piece
            finally:
                stop.set()
                job.result()  # re-raises what the model thread raised; the lock is held until it is done

    def _generate(self, messages: list[dict], settings: GenerationSettings, pieces: queue.Queue,
                  stop: threading.Event) -> None:
        """On the model thread: generate the answer into ``pieces``, then put _DONE (also on failure)."""
        try:
            prompt = fit_history(messages, self.count_tokens, self.n_ctx, settings.max_new_tokens)
            # Re-evaluate the whole prompt: llama-cpp-python's prefix reuse changes the logits
            # slightly, so the same seed and settings would not reproduce the same answer.
            self.llama.reset()
            chunks = self.llama.create_chat_completion(
                prompt,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                seed=settings.seed,
                stream=True,
            )
            try:
                for chunk in chunks:
                    if stop.is_set():
                        break
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        pieces.put(piece)
            finally:
                chunks.close()
        finally:
            pieces.put(_DONE)


_DONE = object()  # the end of an answer's pieces
