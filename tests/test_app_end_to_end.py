"""End to end: the real app process, the real model, driven over its API with gradio_client.

One app serves every test of this module (starting it costs ~10 s); each test uses its own
Client, so its own session and conversation, and looks only at the flags it saved.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from feedback.dataset import flag_features, load_flags_dataset
from feedback.reader import latest_flags, read_flags, shard_paths
from schemas.flag import SCHEMA_VERSION
from space.chat import ChatInputError, check_message
from space.flagging import APP_VERSION
from space.model import EMBEDDED_FILE, embedded_model_path
from tests.conftest import start_app

SYSTEM_PROMPT = "You are a terse assistant. Answer in one sentence."


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One running app for the module, with its own empty feedback folder."""
    tmp = tmp_path_factory.mktemp("e2e")
    running = start_app(tmp / "feedback", tmp / "app.log")
    yield running
    running.kill()


@pytest.fixture(scope="module")
def embedded_sha256() -> str:
    """sha256 of the embedded GGUF's bytes, computed here, independently of the app."""
    return hashlib.sha256(embedded_model_path().read_bytes()).hexdigest()


def new_client(app) -> Client:
    """A client with its own session (and so its own conversation) on the running app."""
    return Client(app.url, verbose=False, analytics_enabled=False, download_files=False)


def text_of(message: dict) -> str:
    """The text of one chatbot message, whether its content is a string or a list of parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def turns(chatbot: list[dict]) -> list[tuple[str, str]]:
    """A chatbot value as (role, text) pairs."""
    return [(m["role"], text_of(m)) for m in chatbot]


def chat(client: Client, message: str, *, system_prompt: str = SYSTEM_PROMPT, temperature: float = 0.0,
         top_p: float = 0.9, max_new_tokens: int = 24, seed: int = 7) -> dict:
    """Send one message; return every streamed answer text and the final chatbot."""
    job = client.submit(message, system_prompt, temperature, top_p, max_new_tokens, seed, api_name="/chat")
    stream = []
    for output in job:
        chatbot = output  # /chat streams the chatbot alone
        if chatbot and chatbot[-1]["role"] == "assistant":
            stream.append(text_of(chatbot[-1]))
    final = job.result()  # raises AppError when the app refused the message
    return {"stream": stream, "chatbot": final, "answer": text_of(final[-1])}


def flag(client: Client, index: int, reasons=(), comment: str = "", correction: str = "",
         thumbs: str = "none") -> tuple[str, int, str]:
    """Save a flag over the API; return (flag_id, revision, confirmation) read from the confirmation."""
    confirmation = client.predict(index, list(reasons), comment, correction, thumbs, api_name="/flag")
    found = re.search(r"`([0-9a-f]+)`", confirmation)
    assert found, f"no flag id in the confirmation {confirmation!r}"
    revision = re.search(r"revision (\d+)", confirmation)
    return found.group(1), int(revision.group(1)) if revision else 1, confirmation


def records_of(app, flag_id: str) -> list:
    """Every revision of one flag on disk, in file order."""
    return [r for r in read_flags(app.feedback_dir).records if r.flag_id == flag_id]


def disk_snapshot(app) -> dict[str, bytes]:
    """The bytes of every shard, to prove a refused request wrote nothing."""
    return {p.name: p.read_bytes() for p in shard_paths(app.feedback_dir)}


def raw_call(app, api: str, data: list, session_hash: str | None = None) -> tuple[str, object]:
    """Call an endpoint over Gradio's plain HTTP API with ASCII-escaped JSON; return (event, data).

    gradio_client cannot even encode a lone surrogate, but JSON can carry one ("\\ud800"),
    so a broken client can send it: this is that client.
    """
    body = json.dumps({"data": data, "session_hash": session_hash}).encode("ascii")
    request = urllib.request.Request(
        f"{app.url}gradio_api/call/{api}", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        event_id = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{app.url}gradio_api/call/{api}/{event_id}", timeout=60) as r:
        events = r.read().decode("utf-8").strip().split("\n\n")
    last = events[-1].splitlines()
    return last[0].removeprefix("event: "), json.loads(last[1].removeprefix("data: "))


def assert_still_serves(client: Client) -> None:
    """A normal chat works: the app survived whatever came before."""
    result = chat(client, "Say OK.", max_new_tokens=4)
    assert result["answer"].strip(), "the app did not answer a normal message"


def test_chat_streams_and_flag_is_saved_with_every_field(app, embedded_sha256):
    client = new_client(app)
    started = datetime.now(timezone.utc)

    result = chat(client, "What is the capital of France?", temperature=0.0, top_p=0.9, max_new_tokens=24, seed=7)
    stream, answer = result["stream"], result["answer"]
    assert len(set(stream)) > 1, f"the answer arrived in one piece, not streamed: {stream}"
    assert all(b.startswith(a) for a, b in zip(stream, stream[1:])), "a streamed update rewrote earlier text"
    assert answer == stream[-1] and answer.strip()
    assert turns(result["chatbot"]) == [("user", "What is the capital of France?"), ("assistant", answer)]

    flag_id, revision, confirmation = flag(
        client, 1, reasons=["incorrect", "incomplete"], comment="It should name the city.",
        correction="Paris, on the Seine.", thumbs="👎 down",
    )
    finished = datetime.now(timezone.utc)
    assert revision == 1 and "Saved" in confirmation

    latest = latest_flags(app.feedback_dir)
    assert latest.bad == []
    record = latest.records[flag_id]
    assert record.schema_version == SCHEMA_VERSION == 1
    assert record.flag_id == flag_id
    assert record.revision == 1
    assert re.fullmatch(r"[0-9a-f]{32}", record.record_id)
    assert record.session_id and record.conversation_id and record.session_id != record.conversation_id
    assert record.app_version == APP_VERSION
    model = record.model
    assert model.source == "embedded"
    assert model.file == EMBEDDED_FILE
    assert Path(model.path) == embedded_model_path()
    assert model.sha256 == embedded_sha256
    assert model.quant == "Q4_1"
    assert (model.repo, model.revision, model.version) == (None, None, None)
    assert record.generation.model_dump() == {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 24, "seed": 7}
    assert record.system_prompt == SYSTEM_PROMPT
    assert [(m.role, m.content) for m in record.conversation] == [
        ("user", "What is the capital of France?"),
        ("assistant", answer),
    ]
    assert record.answer == answer
    assert record.reasons == ["incorrect", "incomplete"]
    assert record.comment == "It should name the city."
    assert record.correction == "Paris, on the Seine."
    assert record.thumbs == "down"
    assert started <= record.created_at <= record.updated_at <= finished

    dataset = load_flags_dataset(app.feedback_dir)
    assert dataset.features == flag_features()
    row = next(r for r in dataset if r["flag_id"] == flag_id)
    assert row["model"]["sha256"] == embedded_sha256
    assert row["conversation"][-1] == {"role": "assistant", "content": answer}
    assert row["generation"]["seed"] == 7


def test_saving_the_same_flag_twice_writes_one_line_and_a_changed_comment_makes_revision_2(app):
    client = new_client(app)
    chat(client, "Name a colour.", max_new_tokens=8)
    settings = dict(reasons=["unhelpful"], comment="too vague", correction="Blue.", thumbs="👎 down")

    flag_id, first, _ = flag(client, 1, **settings)
    again = client.predict(1, ["unhelpful"], "too vague", "Blue.", "👎 down", api_name="/flag")
    assert "already saved (revision 1," in again and "nothing changed" in again
    on_disk = records_of(app, flag_id)
    assert first == 1 and len(on_disk) == 1

    same_id, second, confirmation = flag(client, 1, **{**settings, "comment": "too vague, and wrong"})
    assert (same_id, second) == (flag_id, 2), confirmation
    on_disk = records_of(app, flag_id)
    assert [r.revision for r in on_disk] == [1, 2]
    assert on_disk[1].created_at == on_disk[0].created_at
    assert on_disk[1].updated_at > on_disk[0].updated_at
    assert on_disk[1].record_id != on_disk[0].record_id
    assert on_disk[1].comment == "too vague, and wrong"
    assert latest_flags(app.feedback_dir).records[flag_id].revision == 2


def test_a_random_seed_is_recorded_and_reproduces_the_answer(app):
    prompt = "Write a short poem about the sea."
    client = new_client(app)
    drawn = chat(client, prompt, temperature=0.7, top_p=0.95, max_new_tokens=24, seed=-1)
    flag_id, _, _ = flag(client, 1, comment="which seed?")
    seed = latest_flags(app.feedback_dir).records[flag_id].generation.seed
    assert seed >= 0, f"the record kept seed {seed}, not the one drawn"

    again = chat(new_client(app), prompt, temperature=0.7, top_p=0.95, max_new_tokens=24, seed=seed)
    assert again["answer"] == drawn["answer"], f"seed {seed} did not reproduce the answer"

    # The seed must matter at this temperature, or the equality above proves nothing.
    others = {chat(new_client(app), prompt, temperature=0.7, top_p=0.95, max_new_tokens=24,
                   seed=(seed + k) % 2**31)["answer"] for k in (1, 2, 3)}
    assert others - {drawn["answer"]}, "three other seeds gave the same answer: sampling ignores the seed"


def test_two_clients_chatting_at_once_each_see_only_their_own_conversation(app):
    scripts = {
        "cats": ["Tell me one fact about cats. Codeword: WHISKERS.", "And what do cats eat? Codeword: WHISKERS."],
        "rockets": ["Tell me one fact about rockets. Codeword: THRUSTER.", "And what fuels rockets? Codeword: THRUSTER."],
    }
    results: dict[str, list[dict]] = {name: [] for name in scripts}
    errors: list[BaseException] = []
    clients = {name: new_client(app) for name in scripts}
    start = threading.Barrier(len(scripts))

    def converse(name: str) -> None:
        try:
            start.wait(10)
            for message in scripts[name]:
                results[name].append(chat(clients[name], message, max_new_tokens=32))
        except BaseException as err:  # reported below, with the thread's name
            errors.append(err)

    threads = [threading.Thread(target=converse, args=(name,), name=name) for name in scripts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a conversation did not finish"
    assert errors == []

    for name, messages in scripts.items():
        other = next(n for n in scripts if n != name)
        other_word = "THRUSTER" if name == "cats" else "WHISKERS"
        final = results[name][-1]["chatbot"]
        answers = [r["answer"] for r in results[name]]
        expected = [("user", messages[0]), ("assistant", answers[0]), ("user", messages[1]), ("assistant", answers[1])]
        assert turns(final) == expected, f"{name}'s conversation holds turns that are not its own"
        assert all(other_word not in text for _, text in turns(final)), f"{other}'s codeword leaked to {name}"
        for r in results[name]:
            stream = r["stream"]
            assert r["answer"].strip(), f"{name} got an empty answer"
            assert len(stream) > 1 and all(b.startswith(a) for a, b in zip(stream, stream[1:])), (
                f"{name}'s answer is not one growing stream: {stream}"
            )

        ids = [flag(clients[name], index, comment=f"flag from {name}")[0] for index in (1, 3)]
        latest = latest_flags(app.feedback_dir).records
        assert [(m.role, m.content) for m in latest[ids[1]].conversation] == expected
        assert [(m.role, m.content) for m in latest[ids[0]].conversation] == expected[:2]

    # One generation at a time: each answer is the one its conversation gets when no other client is
    # chatting (greedy, the model reset before every answer); two generations interleaved on the one
    # model would not give it. Not the streams' arrival times: the app sends an answer's last update
    # after the model is free again, so the next answer's first piece may reach its client first.
    alone = {}
    for name, messages in scripts.items():
        client = new_client(app)
        alone[name] = [chat(client, message, max_new_tokens=32)["answer"] for message in messages]
    assert {name: [r["answer"] for r in results[name]] for name in scripts} == alone


def test_bad_input_is_refused_with_a_clear_error_and_writes_nothing(app):
    client = new_client(app)
    before = disk_snapshot(app)

    for empty in ("", "   \n\t "):
        with pytest.raises(AppError, match="Type a message first: an empty message was not sent"):
            chat(client, empty)
    with pytest.raises(AppError, match=r"it is 1,000,000 characters long and the limit is 8,000"):
        chat(client, "x" * 1_000_000)
    with pytest.raises(AppError, match=r"Pick an answer to flag first: there is no answer #1 in this conversation"):
        flag(client, 1, comment="nothing has been answered yet")
    assert disk_snapshot(app) == before

    chat(client, "Say hello.", max_new_tokens=8)
    with pytest.raises(AppError, match=r"Value: 'nonsense' .*is not in the list of choices: \['incorrect'"):
        flag(client, 1, reasons=["incorrect", "nonsense"])
    for missing in (0, 3, 99):  # a user turn, and answers that do not exist
        with pytest.raises(AppError, match=rf"there is no answer #{missing} in this conversation"):
            flag(client, missing, comment="no such answer")
    with pytest.raises(AppError, match=r"The comment is 8,001 characters long and the limit is 8,000"):
        flag(client, 1, comment="c" * 8001)
    assert disk_snapshot(app) == before

    assert_still_serves(client)
    flag_id, revision, _ = flag(client, 1, comment="a good flag after the bad ones")
    assert revision == 1 and records_of(app, flag_id)[0].comment == "a good flag after the bad ones"


def test_a_lone_surrogate_is_refused_by_the_handler_and_over_http(app):
    # gradio_client cannot send one at all: it fails to encode the request. (Iterating a
    # submitted job would hang instead: the error stays in the client's worker thread.)
    with pytest.raises(UnicodeEncodeError):
        new_client(app).predict("broken \ud800 text", SYSTEM_PROMPT, 0, 0.9, 4, 7, api_name="/chat")
    with pytest.raises(ChatInputError, match=r"invalid unicode at position 7 \('\\ud800'\)"):
        check_message("broken \ud800 text", 8000)

    before = disk_snapshot(app)
    event, data = raw_call(app, "chat", ["broken \ud800 text", SYSTEM_PROMPT, 0, 0.9, 4, 7])
    assert event == "error"
    assert data["error"] == (
        "Message not sent: text contains invalid unicode at position 7 ('\\ud800'); send valid UTF-8 text."
    )

    client = new_client(app)
    chat(client, "Say hi.", max_new_tokens=4)
    event, data = raw_call(app, "flag", [1, [], "bad \udc80 comment", "", "none"], client.session_hash)
    assert event == "error"
    assert "Flag not saved: comment" in data["error"] and "'\\udc80'" in data["error"]
    assert disk_snapshot(app) == before
    assert_still_serves(client)


def test_html_and_markdown_in_comment_and_correction_are_stored_verbatim(app):
    client = new_client(app)
    chat(client, "Say something.", max_new_tokens=8)
    comment = '<script>alert("x")</script> <img src=x onerror=alert(1)> & &amp; </textarea>'
    correction = "![pwned](http://evil.example/x.png) [click](javascript:alert(1)) **bold** `code` <b>hi</b>"

    flag_id, _, confirmation = flag(client, 1, reasons=["unsafe"], comment=comment, correction=correction)
    record = latest_flags(app.feedback_dir).records[flag_id]
    assert record.comment == comment
    assert record.correction == correction
    raw_lines = [json.loads(line) for p in shard_paths(app.feedback_dir)
                 for line in p.read_text("utf-8").splitlines() if flag_id in line]
    assert [(d["comment"], d["correction"]) for d in raw_lines] == [(comment, correction)]
    assert "<script>" not in confirmation
