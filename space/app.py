"""The Gradio Blocks app: chat with the served GGUF and flag its answers.

Handlers are plain functions of (state, inputs) so tests can call them without a browser;
``build_demo`` only wires them to components.
"""

from __future__ import annotations

import html
import logging
import time

import gradio as gr
from pydantic import ValidationError

from feedback.store import FlagStore
from schemas.errors import describe
from schemas.flag import REASONS, ChatMessage, GenerationSettings
from schemas.settings import Settings
from space.chat import AnswerContext, ChatInputError, Conversation, Generator, check_message, resolve_seed
from space.flagging import FlagInputError, answer_label, build_flag, existing_flag, save_message
from space.model import ServedModel
from space.review import ReviewApp, md_text, mount_review

log = logging.getLogger(__name__)

# Stream at most one chat update per this many seconds. Gradio steps the generator, then
# postprocesses and sends each update while the model waits, so each costs the answer time
# (bench/chat_overhead.py: one update a token made the app 0.6x as fast as raw llama.cpp).
UI_UPDATE_SECONDS = 0.1

THUMBS = {"👍 up": "up", "👎 down": "down", "none": None}
THUMBS_LABEL = {v: k for k, v in THUMBS.items()}


# Gradio's queue loop wakes every 1 ms while no event waits to start (`Queue.sleep_when_free` in
# gradio/queueing.py): 7 % of a core, all the time, taken from llama.cpp's threads on a small
# machine. Waking every 10 ms delays the start of a queued event by at most 10 ms.
QUEUE_POLL_SECONDS = 0.01


def calm_queue(demo: gr.Blocks) -> None:
    """Make the queue's idle loop wake every QUEUE_POLL_SECONDS (after ``demo.queue()``)."""
    queue = getattr(demo, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):
        log.warning("this Gradio has no Queue.sleep_when_free: its queue keeps polling at its own rate")
        return
    queue.sleep_when_free = QUEUE_POLL_SECONDS


def shown(role: str, text: str) -> dict:
    """A chat message as the Chatbot shows it: as plain text, HTML-escaped, so nothing in it renders."""
    return {"role": role, "content": html.escape(text, quote=False)}


def chat_value(conv: Conversation) -> list[dict]:
    return [shown(m.role, m.content) for m in conv.messages]


class App:
    """The app's shared parts (model, store, settings) and its handlers."""

    def __init__(self, settings: Settings, served: ServedModel, store: FlagStore):
        self.settings = settings
        self.served = served
        self.store = store
        self.generator = Generator(served.llama, settings.n_ctx, served.identity)
        self.model_problem = lambda: None  # what keeps the registry's current version from being served, if anything

    def swap_model(self, served: ServedModel) -> None:
        """Serve another model (a new registry version) from the next answer on; an answer in flight ends on the old one."""
        old = self.generator.swap(served.llama, served.identity)
        self.served = served
        if old is not served.llama:
            old.close()  # nothing uses it any more: free its memory now, not at the next garbage collection

    # --- chat ---------------------------------------------------------------------------
    def respond(self, conv, message, system_prompt, temperature, top_p, max_new_tokens, seed):
        """Stream an answer into the chatbot; ``conv`` (a gr.State) is updated in place at the end.

        Any other output of a streaming event, even a gr.skip(), costs Gradio a component rebuild
        per update, so the textbox and the flag panel are updated once, by ``after_answer``.
        """
        try:
            text = check_message(message, self.settings.max_message_chars)
            gen = resolve_seed(
                GenerationSettings(
                    temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens), seed=int(seed)
                )
            )
        except ChatInputError as err:
            raise gr.Error(str(err)) from None
        except ValidationError as err:
            raise gr.Error(f"Generation settings rejected: {describe(err)}.") from None
        system_prompt = system_prompt or ""
        history = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        history += [m.model_dump() for m in conv.messages] + [{"role": "user", "content": text}]
        display = chat_value(conv) + [shown("user", text), shown("assistant", "")]
        answer = ""
        last = 0.0
        answered_by = []  # the identity of the model that gives this answer (a swap may come right after it)
        try:
            for piece in self.generator.stream(history, gen, on_start=answered_by.append):
                answer += piece
                if time.monotonic() - last >= UI_UPDATE_SECONDS:  # the first piece at once, then throttled
                    last = time.monotonic()
                    display[-1] = shown("assistant", answer)
                    yield display
        except ChatInputError as err:
            raise gr.Error(str(err)) from None
        except Exception as err:  # the model failed: keep the conversation as it was
            log.exception("generation failed")
            raise gr.Error(f"The model failed to answer ({type(err).__name__}: {err}). Try again.") from None
        conv.messages = conv.messages + [
            ChatMessage(role="user", content=text),
            ChatMessage(role="assistant", content=answer),
        ]
        index = len(conv.messages) - 1
        model = next((m for m in answered_by if m is not None), self.served.identity)
        conv.answers[index] = AnswerContext(model, gen, system_prompt)
        yield chat_value(conv)

    def after_answer(self, conv):
        """Clear the textbox and point the flag panel at the answer just given."""
        return ["", *self.panel(conv, max(conv.answers, default=None))]

    def clear(self, conv):
        conv = conv or Conversation()
        conv.clear()
        return [[], conv, "", *self.panel(conv, None)]

    # --- flag panel ---------------------------------------------------------------------
    def panel(self, conv: Conversation, index: int | None) -> list:
        """Flag panel values for answer ``index``: its saved flag, else a blank one prefilled."""
        choices = [(answer_label(i, conv.messages[i].content), i) for i in conv.answer_indices()]
        if index is None or index not in conv.answers:
            return [gr.update(choices=choices, value=None), [], "", "", THUMBS_LABEL[None], ""]
        saved = existing_flag(self.store, conv, index)
        answer = conv.messages[index].content
        if saved is None:
            return [gr.update(choices=choices, value=index), [], "", answer, THUMBS_LABEL[None], ""]
        status = f"This answer has a saved flag (revision {saved.revision})."
        return [
            gr.update(choices=choices, value=index),
            list(saved.reasons),
            saved.comment,
            saved.correction if saved.correction is not None else answer,
            THUMBS_LABEL[saved.thumbs],
            status,
        ]

    def select_answer(self, conv, evt: gr.SelectData):
        """An answer picked in the Answer list: the panel shows its flag."""
        return self.panel(conv or Conversation(), evt.value if isinstance(evt.value, int) else None)

    def on_chat_select(self, conv, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        return self.panel(conv or Conversation(), index)

    def save_flag(self, conv, index, reasons, comment, correction, thumbs):
        """Save the flag panel as a FlagRecord; return the confirmation shown to the user."""
        conv = conv or Conversation()
        try:
            record = build_flag(
                conv,
                None if index is None else int(index),
                thumbs=THUMBS.get(thumbs) if thumbs in THUMBS else thumbs,
                reasons=reasons,
                comment=comment,
                correction=correction,
                max_chars=self.settings.max_comment_chars,
            )
        except FlagInputError as err:
            raise gr.Error(str(err)) from None
        return self._save(record)

    def on_like(self, conv, evt: gr.LikeData):
        """A thumbs click on a message saves it at once, keeping what the panel saved before."""
        conv = conv or Conversation()
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        thumbs = "up" if evt.liked is True else "down" if evt.liked is False else None
        saved = existing_flag(self.store, conv, index)
        try:
            record = build_flag(
                conv,
                index,
                thumbs=thumbs,
                reasons=list(saved.reasons) if saved else [],
                comment=saved.comment if saved else "",
                correction=saved.correction if saved else None,
                max_chars=self.settings.max_comment_chars,
            )
        except FlagInputError as err:
            raise gr.Error(str(err)) from None
        status = self._save(record)
        return [*self.panel(conv, index)[:5], status]

    def _save(self, record) -> str:
        previous = self.store.get(record.flag_id)
        try:
            saved = self.store.save(record)
        except OSError as err:
            log.exception("saving flag %s failed", record.flag_id)
            raise gr.Error(f"Flag NOT saved: the feedback folder could not be written ({err}). Try again.") from None
        return save_message(saved, previous)


def model_card(app: App) -> str:
    m = app.served.identity
    where = f"{html.escape(m.repo)}@{(m.revision or '')[:12]}" if m.repo else m.source
    line = (
        f"**Model** `{html.escape(m.file)}` · {m.quant} · {where} · sha256 `{m.sha256[:12]}`"
        + (f" · version {html.escape(m.version)}" if m.version else "")
    )
    problem = app.model_problem()
    return line + (f"  \n⚠️ {md_text(problem)}" if problem else "")


def build_demo(app: App, review: ReviewApp | None = None) -> gr.Blocks:
    s = app.settings
    with gr.Blocks(title="flagloop") as demo:
        conv = gr.State(lambda: Conversation())  # one per session; handlers update it in place
        gr.Markdown("## flagloop — chat, and flag the answers that are wrong")
        gr.Markdown(lambda: model_card(app), elem_id="model-card")  # read at each page load: the version can change
        with gr.Row():
            with gr.Column(scale=3):
                # Plain, escaped text: user text and answers must not load images or render HTML.
                chatbot = gr.Chatbot(
                    label="Conversation", height=480, elem_id="chatbot", buttons=["copy"], render_markdown=False
                )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Type a message and press Enter", show_label=False, scale=5, elem_id="message"
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                clear = gr.Button("Clear conversation", elem_id="clear")
            with gr.Column(scale=2):
                system_prompt = gr.Textbox(s.system_prompt, label="System prompt", lines=3)
                with gr.Accordion("Generation", open=False):
                    temperature = gr.Slider(0.0, 2.0, s.generation.temperature, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, s.generation.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, 1024, s.generation.max_new_tokens, step=1, label="Max new tokens")
                    seed = gr.Number(s.generation.seed, precision=0, label="Seed (-1: random)")
                with gr.Group(elem_id="flag-panel"):
                    gr.Markdown("### Flag an answer")
                    # Custom values allowed: API callers of /chat never get the choices update (it is a
                    # follow-up event); build_flag checks that the answer exists.
                    answer = gr.Dropdown([], label="Answer", elem_id="flag-answer", allow_custom_value=True)
                    reasons = gr.CheckboxGroup(list(REASONS), label="What is wrong", elem_id="flag-reasons")
                    comment = gr.Textbox(label="Comment", lines=2, elem_id="flag-comment")
                    correction = gr.Textbox(
                        label="Correction: the answer it should have given", lines=4, elem_id="flag-correction"
                    )
                    thumbs = gr.Radio(list(THUMBS), value=THUMBS_LABEL[None], label="Thumbs", elem_id="flag-thumbs")
                    save = gr.Button("Save flag", variant="secondary", elem_id="flag-save")
                    status = gr.Markdown(elem_id="flag-status")

        panel = [answer, reasons, comment, correction, thumbs, status]
        chat_inputs = [conv, message, system_prompt, temperature, top_p, max_new, seed]
        chat_outputs = [chatbot, conv, message, *panel]
        for trigger, name in ((message.submit, "chat"), (send.click, None)):
            trigger(
                app.respond, chat_inputs, [chatbot], api_name=name or False,
                concurrency_id="model", concurrency_limit=1,
            ).success(app.after_answer, [conv], [message, *panel], api_name=False)
        clear.click(app.clear, [conv], chat_outputs, api_name="clear")
        chatbot.clear(app.clear, [conv], chat_outputs, api_name=False)
        # `select`, not `input`: the Dropdown (allow_custom_value) also sends `input` when it merely loses focus
        # or its list is closed, and that stale panel could land after a save and wipe its confirmation.
        answer.select(app.select_answer, [conv], panel, api_name=False)
        chatbot.select(app.on_chat_select, [conv], panel, api_name=False)
        chatbot.like(app.on_like, [conv], [answer, reasons, comment, correction, thumbs, status], api_name=False,
                     concurrency_limit=None)
        save.click(
            app.save_flag, [conv, answer, reasons, comment, correction, thumbs], [status], api_name="flag",
            concurrency_limit=None,
        )
    if review is not None:
        mount_review(demo, review)  # /review: reviewers only, after a login
    return demo
