"""Chat turns: which messages are sent, and how the history is fitted into the context."""

import threading

import pytest

from schemas.flag import GenerationSettings
from schemas.settings import Settings
from space.chat import (
    ChatInputError,
    Generator,
    check_message,
    fit_history,
    resolve_seed,
)
from space.model import load_model


def words(text: str) -> int:
    return len(text.split())


def turns(n: int) -> list[dict]:
    out = [{"role": "system", "content": "sys"}]
    for i in range(n):
        out += [{"role": "user", "content": f"q{i} " * 10}, {"role": "assistant", "content": f"a{i} " * 10}]
    return out + [{"role": "user", "content": "last question"}]


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", None])
def test_empty_or_blank_messages_are_not_sent(text):
    with pytest.raises(ChatInputError, match="Type a message"):
        check_message(text, 100)


def test_too_long_message_says_its_length_and_the_limit():
    with pytest.raises(ChatInputError, match="1,000,000 characters long and the limit is 8,000"):
        check_message("x" * 1_000_000, 8000)


def test_invalid_unicode_message_is_refused():
    with pytest.raises(ChatInputError, match="invalid unicode"):
        check_message("hello \ud83d", 100)


def test_history_that_fits_is_sent_whole():
    msgs = turns(3)
    assert fit_history(msgs, words, n_ctx=1000, max_new_tokens=100) == msgs


def test_oldest_turns_are_dropped_first_and_system_prompt_kept():
    msgs = turns(10)
    fitted = fit_history(msgs, words, n_ctx=120, max_new_tokens=20)
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1]
    assert fitted[1]["role"] == "user" and len(fitted) < len(msgs)
    assert fitted[1:] == msgs[len(msgs) - len(fitted) + 1:]


def test_a_message_too_big_for_the_context_is_a_clear_error():
    msgs = [{"role": "user", "content": "w " * 500}]
    with pytest.raises(ChatInputError, match="does not fit in the model's 256-token context"):
        fit_history(msgs, words, n_ctx=256, max_new_tokens=64)


def test_random_seed_is_replaced_by_the_seed_used():
    drawn = resolve_seed(GenerationSettings(seed=-1))
    assert drawn.seed >= 0
    assert resolve_seed(GenerationSettings(seed=5)).seed == 5


@pytest.fixture(scope="module")
def generator():
    served = load_model(Settings(n_ctx=512, n_threads=2))
    return Generator(served.llama, 512)


def test_greedy_answers_are_reproducible(generator):
    msgs = [{"role": "user", "content": "Name a colour."}]
    settings = GenerationSettings(temperature=0.0, max_new_tokens=12, seed=1)
    first = "".join(generator.stream(msgs, settings))
    assert first and first == "".join(generator.stream(msgs, settings))


def test_a_long_message_over_the_real_context_is_refused_not_crashed(generator):
    msgs = [{"role": "user", "content": "banana " * 2000}]
    with pytest.raises(ChatInputError, match="does not fit"):
        list(generator.stream(msgs, GenerationSettings(max_new_tokens=16, seed=1)))


def test_generations_never_overlap(generator):
    active, overlaps = [0], []
    real = generator.llama.create_chat_completion

    def spy(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            active[0] += 1
            overlaps.append(active[0] > 1)
            yield chunk
            active[0] -= 1

    generator.llama.create_chat_completion = spy
    try:
        settings = GenerationSettings(temperature=0.0, max_new_tokens=8, seed=1)
        threads = [
            threading.Thread(target=lambda: list(generator.stream([{"role": "user", "content": "Hi"}], settings)))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del generator.llama.create_chat_completion
    assert overlaps and not any(overlaps)


def test_every_generation_runs_on_the_one_model_thread(generator):
    """Gradio steps a stream in any free worker thread; llama.cpp must still be called from one thread,
    or each new calling thread leaves a compute thread behind that slows every later answer."""
    callers, real = [], generator.llama.create_chat_completion

    def spy(*args, **kwargs):
        callers.append(threading.get_ident())
        return real(*args, **kwargs)

    generator.llama.create_chat_completion = spy
    try:
        settings = GenerationSettings(temperature=0.0, max_new_tokens=4, seed=1)
        answers = []
        for _ in range(3):  # each from a new thread, as Gradio's worker threads would
            t = threading.Thread(target=lambda: answers.append(
                "".join(generator.stream([{"role": "user", "content": "Hi"}], settings))))
            t.start()
            t.join()
    finally:
        del generator.llama.create_chat_completion
    assert len(callers) == 3 and len(set(callers)) == 1
    assert callers[0] not in {threading.get_ident()}
    assert len(set(answers)) == 1 and answers[0]


def test_closing_a_stream_early_stops_the_generation_and_frees_the_model(generator):
    settings = GenerationSettings(temperature=0.0, max_new_tokens=64, seed=1)
    stream = generator.stream([{"role": "user", "content": "Count from one to fifty."}], settings)
    next(stream)
    stream.close()  # a client went away mid-answer
    assert generator.lock.acquire(timeout=5)  # the lock is free again: the model thread stopped
    generator.lock.release()
    assert "".join(generator.stream([{"role": "user", "content": "Hi"}],
                                    GenerationSettings(temperature=0.0, max_new_tokens=4, seed=1)))


def test_the_apps_queue_polls_at_the_calmer_rate():
    """The pinned Gradio still has the attribute calm_queue sets: an upgrade that renames it fails here."""
    import gradio as gr

    from space.app import QUEUE_POLL_SECONDS, calm_queue

    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    calm_queue(demo)
    assert demo._queue.sleep_when_free == QUEUE_POLL_SECONDS > 0.001
