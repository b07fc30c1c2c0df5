"""Chat overhead: what the app's streaming path costs on top of raw llama-cpp-python.

In one run, on the same GGUF, prompts, threads and greedy settings, it measures tokens/s and time
to first token (TTFT) of

  raw  ``llama_cpp.Llama(...).create_chat_completion(messages, stream=True)`` in this process;
  app  the real app (``python -m space`` on a free loopback port), streamed end to end through
       its ``/chat`` API the way its web page does (``--client browser``, the default: one
       keep-alive HTTP session, ``queue/join`` then the session's ``queue/data`` event stream),
       or with gradio_client (``--client gradio_client``, which adds its own per-request costs:
       a new HTTP client and SSL context per request, a 50 ms idle poll). TTFT is the arrival of
       the first update whose answer is not empty.

Repetitions are interleaved (raw/app, then app/raw, ...) after one warm-up of each, so machine
noise hits both alike; never both at once, as each uses every core it is given. Each repetition
uses the next prompt of the list on both sides. Like the app (space.chat.Generator.stream), raw
calls ``llama.reset()`` before each answer, so both evaluate the whole prompt and greedy decoding
gives both the same answer (llama-cpp-python's prefix reuse changes the logits slightly); pass
``--raw-prefix-reuse`` to see what skipping that costs. Tokens are counted by tokenizing the
final answer with the same llama tokenizer, and the two answers must be equal (greedy) for the
counts to compare.

It also reports CPU seconds per answer: of the generating process (this one for raw, the app's
for app), of the client (this process, app runs only: a browser would be on another
machine) and of everything else on the machine. Other work steals cores from llama.cpp and
slows it many times over, so each run first waits a little for the machine to be quiet, a run
that other processes disturbed anyway (more than 0.2 cores on average) is marked ``!``, pairs
keep being added until ``--reps`` pairs ran undisturbed (or ``--budget`` runs out), and the
medians and the verdict are taken over the undisturbed pairs only.

tokens/s is tokens over the whole answer time (end to end, TTFT included); "after the first
token" is the streaming rate without TTFT.

Last, and free of that noise, it times the server's share of one streamed update, in this
process: Gradio's postprocessing and diffing of an update exactly as the real ``App.respond``
yields it (its model swapped for one that answers at once), for histories of 0, 10 and 40 turns,
next to the same for a Blocks whose only output is a Chatbot. Gradio drives a generator one step
at a time, so the model waits while each update is processed.

    .venv/bin/python bench/chat_overhead.py              # embedded model, 2 threads, 7 undisturbed pairs
    .venv/bin/python bench/chat_overhead.py --reps 9 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import html
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the seasons on Earth?",
    "Give me five tips for learning a new language.",
    "Describe how bread is made, step by step.",
    "Why is the sky blue?",
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One streamed answer and how long it took."""

    path: str  # raw | app
    rep: int
    prompt: str
    text: str
    ttft: float  # seconds to the first non-empty piece of the answer
    total: float  # seconds to the end of the stream
    updates: int  # streamed pieces (raw) or UI updates (app) received
    cpu: float  # CPU seconds of the generating process
    client_cpu: float = 0.0  # CPU seconds of this process during an app run (the client)
    others_cpu: float = 0.0  # CPU seconds of every other process on the machine during the run
    tokens: int = 0
    roundtrip: float = 0.0  # seconds of an API call that does not touch the model (/clear), app runs only

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total if self.total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second after the first: the streaming rate, without TTFT."""
        return (self.tokens - 1) / (self.total - self.ttft) if self.total > self.ttft else 0.0

    @property
    def disturbed(self) -> bool:
        """Other processes used more than a fifth of a core on average while this ran."""
        return self.others_cpu > 0.2 * self.total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads on both sides (default 2)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window on both sides (default 2048, the app's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default 128)")
    p.add_argument("--reps", type=int, default=7,
                   help="(raw, app) pairs to measure undisturbed by other processes (default 7)")
    p.add_argument("--budget", type=float, default=150.0,
                   help="most seconds to spend adding pairs until --reps ran undisturbed (default 150)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; greedy anyway)")
    p.add_argument("--system-prompt", default="You are a helpful assistant.")
    p.add_argument("--prompt", action="append", dest="prompts",
                   help="a user prompt; repeat for several (default: 6 built-in prompts, used in turn)")
    p.add_argument("--raw-prefix-reuse", action="store_true",
                   help="let raw reuse the previous prompt's evaluated prefix (the app does not)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of idle between runs (default 0.5)")
    p.add_argument("--max-background", type=float, default=0.2,
                   help="before each run, wait until other processes use at most this many cores (default 0.2)")
    p.add_argument("--quiet-timeout", type=float, default=5.0,
                   help="longest wait for that, in seconds, before running anyway (default 5)")
    p.add_argument("--min-clean", type=int, default=3,
                   help="summarize only undisturbed pairs when there are at least this many (default 3)")
    p.add_argument("--no-update-cost", dest="update_cost", action="store_false",
                   help="skip the in-process timing of one streamed update")
    p.add_argument("--client", choices=("browser", "gradio_client"), default="browser",
                   help="browser (default): one keep-alive HTTP session reading the event stream as the web page does; "
                        "gradio_client: gradio_client.Client.submit, with its own per-request costs (~100 ms a request)")
    p.add_argument("--verbose", action="store_true", help="print every run as it finishes")
    return p.parse_args(argv)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy() -> float:
    """CPU seconds all processes together have used since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet(pids: list[int], max_cores: float, timeout: float, window: float = 0.5) -> float:
    """Wait until processes other than ``pids`` use at most ``max_cores``; return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, ours0 = machine_busy(), sum(process_cpu(p) for p in pids)
        time.sleep(window)
        cores = (machine_busy() - busy0 - (sum(process_cpu(p) for p in pids) - ours0)) / window
        if cores <= max_cores or time.monotonic() >= deadline:
            return cores


def messages_for(system_prompt: str, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return system + [{"role": "user", "content": prompt}]


def raw_run(llm, rep: int, prompt: str, args) -> Run:
    """Stream one answer straight from llama-cpp-python, as space.chat.Generator calls it."""
    messages = messages_for(args.system_prompt, prompt)
    cpu0 = process_cpu(os.getpid())
    start = time.perf_counter()
    if not args.raw_prefix_reuse:
        llm.reset()
    first = None
    pieces: list[str] = []
    for chunk in llm.create_chat_completion(
        messages, temperature=0.0, top_p=0.95, max_tokens=args.max_new_tokens, seed=args.seed, stream=True
    ):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            if first is None:
                first = time.perf_counter() - start
            pieces.append(piece)
    total = time.perf_counter() - start
    cpu = process_cpu(os.getpid()) - cpu0
    return Run("raw", rep, prompt, "".join(pieces), first or total, total, len(pieces), cpu)


def assistant_text(chatbot) -> str:
    """The last assistant message's text in a Chatbot value as gradio_client returns it.

    The app shows text HTML-escaped (space.app.shown), so it is unescaped back to the model's text.
    """
    if not chatbot or chatbot[-1].get("role") != "assistant":
        return ""
    content = chatbot[-1]["content"]
    if not isinstance(content, str):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return html.unescape(content)


class TimedOutputs(list):
    """A job's list of streamed outputs that notes when each one arrived.

    gradio_client's Job iterator polls that list every millisecond, which on a 2-core machine
    takes CPU from the model (a browser would run elsewhere); so the job's list is swapped for
    this one and the job is awaited instead, and the arrival times are read afterwards.
    """

    def __init__(self, items=()):
        super().__init__(items)
        self.times = [time.perf_counter()] * len(self)

    def append(self, item) -> None:
        self.times.append(time.perf_counter())
        super().append(item)


def app_run(client, app_pid: int, rep: int, prompt: str, args) -> Run:
    """Stream one answer through the running app's /chat API, in a fresh conversation."""
    t0 = time.perf_counter()
    client.predict(api_name="/clear")  # the session's conversation would otherwise grow each run
    roundtrip = time.perf_counter() - t0
    cpu0, client0 = process_cpu(app_pid), process_cpu(os.getpid())
    start = time.perf_counter()
    job = client.submit(
        prompt, args.system_prompt, 0.0, 0.95, args.max_new_tokens, args.seed, api_name="/chat"
    )
    outputs = job.communicator.job.outputs = TimedOutputs(job.communicator.job.outputs)
    final = job.result()
    total = time.perf_counter() - start
    cpu, client = process_cpu(app_pid) - cpu0, process_cpu(os.getpid()) - client0
    arrivals = zip(outputs.times, outputs, strict=True)
    first = next((arrived - start for arrived, out in arrivals if chatbot_text(out)), total)
    return Run("app", rep, prompt, chatbot_text(final), first, total, len(outputs), cpu, client, roundtrip=roundtrip)


class BrowserLikeClient:
    """Streams /chat as the app's web page does: one keep-alive HTTP client for the whole session.

    Per request it POSTs ``queue/join`` and reads the session's ``queue/data`` event stream on
    a pooled connection, stamping each message as it arrives (no polling thread, no new client
    or SSL context per request: the per-request costs gradio_client adds and a browser does not).
    Streamed updates are diffs (Gradio's sse_v3 protocol); they are applied with gradio_client's
    own ``apply_diff``.
    """

    def __init__(self, url: str):
        import uuid

        import httpx
        from gradio_client import Client

        config = Client(url, verbose=False)  # only to read the endpoints' fn_index and state inputs
        self.endpoints = {e.api_name.lstrip("/"): e for e in config.endpoints.values() if e.api_name}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/gradio_api/", timeout=None)
        self.session = uuid.uuid4().hex[:11]

    def call(self, api_name: str, *args) -> tuple[list, list[float], object]:
        """Run one event; return (streamed outputs, their arrival times, final output)."""
        from gradio_client.utils import apply_diff

        endpoint = self.endpoints[api_name]
        data = list(endpoint.insert_empty_state(*args))
        joined = self.http.post("queue/join", json={
            "data": data, "fn_index": endpoint.fn_index, "session_hash": self.session, "event_data": None,
            "trigger_id": None,
        })
        joined.raise_for_status()
        event_id = joined.json()["event_id"]
        outputs, times, current = [], [], None
        with self.http.stream("GET", "queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id:
                    continue
                if msg["msg"] == "process_generating":
                    out = msg["output"]["data"]
                    current = out if current is None else [apply_diff(c, d) for c, d in zip(current, out)]
                    times.append(time.perf_counter())
                    outputs.append(current[0])
                elif msg["msg"] == "process_completed":
                    if not msg.get("success", True):
                        raise RuntimeError(f"/{api_name} failed: {msg.get('output')}")
                    return outputs, times, msg["output"]["data"][0]

    def close(self) -> None:
        self.http.close()


def browser_app_run(client: BrowserLikeClient, app_pid: int, rep: int, prompt: str, args) -> Run:
    """Stream one answer through the running app, as its web page would, in a fresh conversation."""
    t0 = time.perf_counter()
    client.call("clear")
    roundtrip = time.perf_counter() - t0
    cpu0, client0 = process_cpu(app_pid), process_cpu(os.getpid())
    start = time.perf_counter()
    outputs, times, final = client.call(
        "chat", prompt, args.system_prompt, 0.0, 0.95, args.max_new_tokens, args.seed
    )
    total = time.perf_counter() - start
    cpu, client_cpu = process_cpu(app_pid) - cpu0, process_cpu(os.getpid()) - client0
    first = next((t - start for t, out in zip(times, outputs) if assistant_text(out)), total)
    return Run("app", rep, prompt, assistant_text(final), first, total, len(outputs), cpu, client_cpu,
               roundtrip=roundtrip)


def chatbot_text(output) -> str:
    """The answer's text in one /chat output: the chatbot alone, or first of a tuple of outputs."""
    return assistant_text(output[0] if isinstance(output, tuple) else output)


def with_others(run_once, pids: list[int]) -> Run:
    """Run ``run_once()`` and add to its Run the CPU time processes other than ``pids`` used meanwhile."""
    busy0, ours0 = machine_busy(), sum(process_cpu(p) for p in pids)
    run = run_once()
    ours = sum(process_cpu(p) for p in pids) - ours0
    run.others_cpu = max(0.0, machine_busy() - busy0 - ours)
    return run


class InstantGenerator:
    """Stands in for space.chat.Generator: yields the pieces of a fixed answer at once."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def stream(self, messages, settings, on_start=None):
        if on_start is not None:
            on_start(None)  # no identity of its own: the app stamps its served model's
        yield from self.pieces


def history(turns: int) -> list:
    from schemas.flag import ChatMessage

    messages = []
    for t in range(turns):
        messages += [ChatMessage(role="user", content=f"Question {t}: " + "why is that so? " * 4),
                     ChatMessage(role="assistant", content="Because of this and that. " * 20)]
    return messages


async def time_update(demo, fn, value, session: str, times: int = 200, warmup: int = 20) -> float:
    """Median seconds Gradio takes to postprocess and diff one streamed ``value`` of ``fn``."""
    from gradio.state_holder import SessionState

    state = SessionState(demo)
    spent = []
    for _ in range(warmup + times):
        t0 = time.perf_counter()
        data = await demo.postprocess_data(fn, value, state)
        demo.handle_streaming_diffs(fn, data, session, "run", final=False)
        spent.append(time.perf_counter() - t0)
    return median(spent[warmup:])


def update_cost(llm, model: Path, args) -> None:
    """Print the server's CPU time per streamed update: the app's /chat vs a Chatbot-only Blocks.

    The update timed is the first one the real App.respond yields (its model swapped for one
    that answers at once), postprocessed and diffed over and over as Gradio does for each yield.
    """
    import asyncio

    import gradio as gr

    from feedback.store import FlagStore
    from schemas.settings import Settings
    from space.app import App, build_demo
    from space.chat import AnswerContext, Conversation
    from space.model import ModelFile, ServedModel, identify

    with tempfile.TemporaryDirectory(prefix="flagloop-bench-") as tmp:
        settings = Settings(feedback_dir=tmp, n_threads=args.threads, n_ctx=args.n_ctx)
        app = App(settings, ServedModel(llm, identify(ModelFile(model, "local"), llm)), FlagStore(tmp))
        app.generator = InstantGenerator([" word"] * 8)
        demo = build_demo(app)
        chat_fn = next(f for f in demo.fns.values() if f.api_name == "chat")
        with gr.Blocks() as bare:
            chatbot = gr.Chatbot()
            gr.Button().click(lambda: None, None, [chatbot])
        bare_fn = next(iter(bare.fns.values()))
        print("\nserver CPU per streamed update (Gradio postprocess + diff of one update, in this process; "
              "the model waits meanwhile):")
        print(f"{'history turns':<14} {'app /chat ms':>12} {'Chatbot only ms':>16}")
        for turns in (0, 10, 40):
            conv = Conversation()
            conv.messages = history(turns)
            conv.answers = {i: AnswerContext(app.served.identity, settings.generation, "") for i in
                            range(1, len(conv.messages), 2)}
            steps = app.respond(conv, "Tell me more.", args.system_prompt, 0.0, 0.95, args.max_new_tokens, args.seed)
            first = next(steps)  # a streamed update exactly as the app yields it
            steps.close()
            app_ms = asyncio.run(time_update(demo, chat_fn, first, f"app{turns}")) * 1000
            shown = [m.model_dump() for m in conv.messages] + [{"role": "user", "content": "Tell me more."},
                                                               {"role": "assistant", "content": " word"}]
            bare_ms = asyncio.run(time_update(bare, bare_fn, shown, f"bare{turns}")) * 1000
            print(f"{turns:<14} {app_ms:>12.2f} {bare_ms:>16.2f}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_runs(runs: list[Run]) -> None:
    print(f"{'rep':>3}  {'path':<4} {'TTFT ms':>8} {'total s':>8} {'tokens':>6} {'tok/s':>7} {'after1st':>8} "
          f"{'updates':>7} {'CPU s':>6} {'client':>6} {'others':>6}  prompt")
    for r in runs:
        client = f"{r.client_cpu:>6.2f}" if r.path == "app" else f"{'-':>6}"
        mark = "!" if r.disturbed else " "
        print(f"{r.rep:>3}{mark} {r.path:<4} {r.ttft * 1000:>8.1f} {r.total:>8.3f} {r.tokens:>6} "
              f"{r.tokens_per_s:>7.1f} {r.decode_tokens_per_s:>8.1f} {r.updates:>7} {r.cpu:>6.2f} {client} "
              f"{r.others_cpu:>6.2f}  {r.prompt[:36]}")


def print_summary(raw: list[Run], app: list[Run], label: str) -> float:
    """Print the medians side by side; return the app/raw ratio of median tokens/s."""
    raw_tps, app_tps = median([r.tokens_per_s for r in raw]), median([r.tokens_per_s for r in app])
    raw_ttft, app_ttft = median([r.ttft for r in raw]) * 1000, median([r.ttft for r in app]) * 1000
    raw_cpu = median([r.cpu / max(r.tokens, 1) * 1000 for r in raw])
    app_cpu = median([r.cpu / max(r.tokens, 1) * 1000 for r in app])
    ratio = app_tps / raw_tps
    paired = median([a.tokens_per_s / r.tokens_per_s for r, a in zip(raw, app, strict=True)])
    print()
    print(f"{label:<32} {'raw':>10} {'app':>10} {'app vs raw':>12}")
    print(f"{'tokens/s (end to end)':<32} {raw_tps:>10.1f} {app_tps:>10.1f} {ratio:>11.3f}x")
    raw_dec, app_dec = median([r.decode_tokens_per_s for r in raw]), median([r.decode_tokens_per_s for r in app])
    print(f"{'tokens/s after the first token':<32} {raw_dec:>10.1f} {app_dec:>10.1f} {app_dec / raw_dec:>11.3f}x")
    print(f"{'TTFT ms':<32} {raw_ttft:>10.1f} {app_ttft:>10.1f} {app_ttft - raw_ttft:>+10.1f}ms")
    print(f"{'CPU ms/token, model process':<32} {raw_cpu:>10.2f} {app_cpu:>10.2f} {app_cpu - raw_cpu:>+10.2f}ms")
    app_client = median([r.client_cpu / max(r.tokens, 1) * 1000 for r in app])
    print(f"{'CPU ms/token, client':<32} {'-':>10} {app_client:>10.2f}")
    print(f"{'API round trip ms (/clear)':<32} {'-':>10} {median([r.roundtrip for r in app]) * 1000:>10.1f}")
    raw_updates, app_updates = median([r.updates for r in raw]), median([r.updates for r in app])
    print(f"{'updates per answer':<32} {raw_updates:>10.0f} {app_updates:>10.0f}")
    print(f"{'tokens/s, median of pair ratios':<32} {'':>10} {'':>10} {paired:>11.3f}x")
    return ratio


def undisturbed(pair: tuple[Run, Run]) -> bool:
    return not (pair[0].disturbed or pair[1].disturbed)


def measure_pairs(llm, client, app_pid: int, args) -> list[tuple[Run, Run]]:
    """Interleaved (raw, app) pairs, until ``reps`` of them ran undisturbed or the time budget is spent."""
    prompts = args.prompts or PROMPTS
    pids = [os.getpid(), app_pid]
    pairs: list[tuple[Run, Run]] = []
    deadline = time.monotonic() + args.budget
    while sum(map(undisturbed, pairs)) < args.reps and (time.monotonic() < deadline or not pairs):
        rep = len(pairs) + 1
        prompt = prompts[(rep - 1) % len(prompts)]
        runs = {}
        for path in ("raw", "app") if rep % 2 else ("app", "raw"):
            time.sleep(args.pause)
            wait_for_quiet(pids, args.max_background, args.quiet_timeout)
            if path == "raw":
                run = with_others(partial(raw_run, llm, rep, prompt, args), pids)
            else:
                run_app = browser_app_run if isinstance(client, BrowserLikeClient) else app_run
                run = with_others(partial(run_app, client, app_pid, rep, prompt, args), pids)
            run.tokens = len(llm.tokenize(run.text.encode("utf-8"), add_bos=False, special=False))
            runs[path] = run
            if args.verbose:
                print_runs([run])
        pairs.append((runs["raw"], runs["app"]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the app and cleans up
    import llama_cpp
    from gradio_client import Client

    from space.model import embedded_model_path
    from tests.conftest import start_app

    model = args.model or embedded_model_path()
    print(f"client {args.client}  model {model}  threads {args.threads}  n_ctx {args.n_ctx}  max_new_tokens {args.max_new_tokens}  "
          f"reps {args.reps}  greedy (temperature 0, seed {args.seed})  cpus {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    env = {"FLAGLOOP_N_THREADS": str(args.threads), "FLAGLOOP_N_CTX": str(args.n_ctx)}
    if args.model:
        env["FLAGLOOP_MODEL_PATH"] = str(args.model)
    with tempfile.TemporaryDirectory(prefix="flagloop-bench-") as tmp:
        app = start_app(Path(tmp) / "feedback", Path(tmp) / "app.log", extra_env=env)
        try:
            client = BrowserLikeClient(app.url) if args.client == "browser" else Client(app.url, verbose=False)
            # Warm-up: first-decode costs (page faults, buffers) and Gradio's first-request paths.
            warm = "Say hello."
            raw_run(llm, 0, warm, args)
            (browser_app_run if args.client == "browser" else app_run)(client, app.proc.pid, 0, warm, args)
            pairs = measure_pairs(llm, client, app.proc.pid, args)
        finally:
            app.kill()
    print()
    print_runs([run for pair in pairs for run in pair])
    clean = [p for p in pairs if undisturbed(p)]
    print(f"\n{len(pairs)} pairs ran, {len(clean)} undisturbed (other processes used under "
          f"0.2 cores during both runs); the medians are over the undisturbed pairs"
          + ("" if len(clean) >= min(args.min_clean, args.reps) else f" only when there are {args.min_clean} or more"))
    summarized = clean if len(clean) >= min(args.min_clean, args.reps) else pairs
    label = f"median of {len(summarized)} {'undisturbed' if summarized is clean else 'all'} pairs"
    ratio = print_summary([r for r, _ in summarized], [a for _, a in summarized], label)
    if summarized is not clean:
        print(f"WARNING: only {len(clean)} pairs ran undisturbed, so these medians include runs that other "
              "processes slowed down: rerun on a quieter machine")
    differ = [r.rep for r, a in pairs if r.text != a.text]
    if args.update_cost:
        update_cost(llm, model, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if summarized is clean:
        verdict = "MET" if ratio >= 0.95 else "NOT MET"
    else:
        verdict = "UNKNOWN: too few undisturbed pairs to tell"
    print(f"goal: app tokens/s >= 0.95 x raw: {ratio:.3f} -> {verdict}")
    if differ:
        print(f"WARNING: raw and app answers differ in reps {differ}: token counts are not comparable")
        return 1
    print("raw and app answers are identical in every rep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
