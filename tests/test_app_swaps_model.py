"""The app follows the model registry: a new current version takes over between answers, never during one.

The real app process serves a real registry (tests/conftest.py start_app with FLAGLOOP_REGISTRY_DIR);
v1 is the embedded GGUF (Q4_1), v2 the same model re-quantized to Q8_0 by llama.cpp (another file, another
sha256). The test publishes and rolls back with retrain.registry, as the pipeline does, and reads the
flag records the app wrote.
"""

from __future__ import annotations

import time
from pathlib import Path

import llama_cpp
import pytest

from feedback.reader import latest_flags
from retrain.registry import LocalRegistry
from space.model import embedded_model_path
from tests.conftest import start_app
from tests.test_app_end_to_end import flag, new_client, text_of

POLL_S = 0.3
LONG_PROMPT = "Count from 1 to 100, separated by commas."  # greedy: it counts on past max_new_tokens


def requantize(src: Path, dst: Path, ftype: int = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0) -> Path:
    """Write `src` re-quantized by llama.cpp (seconds for a 135M model)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A registry whose current version is v1 (the embedded GGUF), a Q8_0 file ready to publish, and the app on it."""
    tmp = tmp_path_factory.mktemp("swap")
    embedded = embedded_model_path()
    registry = LocalRegistry(tmp / "registry")
    v1 = registry.publish(embedded, base_sha256="0" * 64, run_id="seed")
    q8 = requantize(embedded, tmp / "SmolLM2-135M-Instruct.Q8_0.gguf")
    app = start_app(tmp / "feedback", tmp / "app.log", extra_env={
        "FLAGLOOP_REGISTRY_DIR": str(registry.root), "FLAGLOOP_REGISTRY_POLL_SECONDS": str(POLL_S),
    })
    yield app, registry, v1, q8
    app.kill()


def record_of(app, flag_id: str):
    return latest_flags(app.feedback_dir).records[flag_id]


def wait_for_log(app, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in app.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in the app log after {timeout} s:\n{app.log.read_text()[-3000:]}"
        time.sleep(0.1)


def ask(client, message: str, max_new_tokens: int = 16):
    """Submit one message (greedy); the job, to stream or wait on."""
    return client.submit(message, "", 0.0, 0.9, max_new_tokens, 7, api_name="/chat")


def test_a_new_version_takes_over_after_the_answer_in_flight_and_a_rollback_brings_the_old_one_back(setup):
    app, registry, v1, q8 = setup
    client = new_client(app)

    # v1 serves from the start, and a flag names it.
    ask(client, "What is the capital of France?").result()
    first = record_of(app, flag(client, 1, thumbs="👍 up")[0]).model
    assert (first.version, first.sha256, first.quant, first.source) == ("v1", v1.sha256, "Q4_1", "local")
    assert Path(first.path) == registry.path_of(v1)

    # v2 is published while a long answer streams: v2 is loaded meanwhile and waits for that answer to end.
    job = ask(client, LONG_PROMPT, max_new_tokens=160)
    pieces = iter(job)
    shown = [text_of(next(pieces)[-1])]
    v2 = registry.publish(q8, base_sha256=v1.sha256, run_id="run-2")
    waiting_seen_at = None
    for chatbot in pieces:
        shown.append(text_of(chatbot[-1]))
        if waiting_seen_at is None and "v2 is loaded" in app.log.read_text(errors="replace"):
            waiting_seen_at = len(shown)
    answer = text_of(job.result()[-1])
    assert waiting_seen_at is not None and waiting_seen_at < len(shown), (
        "v2 was not loaded while the answer streamed: nothing shows the swap waited for it"
    )
    assert answer == shown[-1] and len(answer) > len(shown[waiting_seen_at - 1])  # it went on after v2 was ready
    in_flight = record_of(app, flag(client, 3, thumbs="👎 down")[0])
    assert in_flight.answer == answer and in_flight.model.version == "v1" and in_flight.model.sha256 == v1.sha256

    # The next answer comes from v2, and its flag says so.
    wait_for_log(app, "now serving v2")
    ask(client, "Name a colour.").result()
    after = record_of(app, flag(client, 5)[0]).model
    assert (after.version, after.sha256, after.quant) == ("v2", v2.sha256, "Q8_0")
    assert after.sha256 != v1.sha256 and Path(after.path) == registry.path_of(v2)

    # A rollback is followed the same way.
    registry.rollback("v1")
    wait_for_log(app, "now serving v1")
    ask(client, "Name a fruit.").result()
    back = record_of(app, flag(client, 7)[0]).model
    assert (back.version, back.sha256, back.quant) == ("v1", v1.sha256, "Q4_1")


def test_a_version_that_does_not_load_is_skipped_and_the_app_keeps_serving(setup, tmp_path):
    app, registry, v1, _ = setup
    broken = tmp_path / "broken.gguf"
    # A GGUF cut short inside its tensor data: the header reads (the registry takes it), llama.cpp cannot load it.
    from retrain.gguf_file import read_gguf

    header = read_gguf(embedded_model_path())
    broken.write_bytes(embedded_model_path().read_bytes()[: header.data_offset + 1024 * 1024])
    bad = registry.publish(broken, base_sha256=v1.sha256, run_id="broken")
    wait_for_log(app, f"registry version {bad.version} cannot be served")

    client = new_client(app)
    ask(client, "Say hello.").result()
    served = record_of(app, flag(client, 1)[0]).model
    assert served.version == "v1"  # what served before the broken version was published
