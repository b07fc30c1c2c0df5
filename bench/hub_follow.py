"""Published on the Hub -> served by the app: seconds from a version's publish to the app serving it.

Starts the real app (`python -m space`) with `registry_repo` on tests/hubserver.py's Hub-protocol
server (127.0.0.1, a token, the real huggingface_hub client, an empty HF cache) and the registry
poll at --poll seconds (default 10, the app's default). v1, the embedded GGUF, is published before
the app starts. Then, one after the other, as the training host would (retrain.registry.HubRegistry):

- v2: the embedded model re-quantized to Q8_0 (the embedded model's default export type): a new file;
- rollback to v1: already in the app's HF cache, nothing to download;
- v3: the same model in Q5_1: a new file again.

For each, from the app's own log: when the poll saw it (``detected``), how long the download took
(``fetch``: hf_hub_download into the HF cache, sha256 checked), the load by llama.cpp (``load``),
and when the generator had it (``served``: the next answer comes from it); then one question to
/chat confirms it answers. The goal is poll interval + download + load, nothing more: ``other`` is
what is left of publish -> served after the wait for the poll, the fetch and the load.

    .venv/bin/python bench/hub_follow.py
    .venv/bin/python bench/hub_follow.py --poll 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from hub_push import TOKEN, EnvPatch  # noqa: E402

from tests.hubserver import HubServer, point_hub_client_at  # noqa: E402

REPO = "flagloop-bench/follow-model"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_lines(log: Path, after: float):
    """(epoch seconds, line) of each app log line stamped at or after `after`."""
    for line in log.read_text(errors="replace").splitlines():
        if (m := STAMP.match(line)) is not None:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= after - 0.01:
                yield at, line


def log_time(log: Path, text: str, after: float) -> float | None:
    """The time of the first app log line after `after` that contains `text`."""
    return next((at for at, line in log_lines(log, after) if text in line), None)


def fetched_seconds(log: Path, version: str, after: float) -> float:
    """How long the app's download of `version` took, from its `fetched ...` log line (0 if none)."""
    line = next((line for _, line in log_lines(log, after) if f"fetched {version} of" in line), None)
    return float(re.search(r" in ([\d.]+) s$", line).group(1)) if line else 0.0


def publish(path: Path, name: str):
    from retrain.registry import HubRegistry
    from schemas.registry import ModelVersion
    from space.model import sha256_of

    quant = re.search(r"\.(Q\w+)\.gguf$", path.name).group(1)
    version = ModelVersion(version=name, file=path.name, sha256=sha256_of(path), bytes=path.stat().st_size,
                           quant=quant, base_sha256="0" * 64, run_id=f"bench-{name}")
    return HubRegistry(REPO, token=TOKEN).publish(path, version)


def wait_log(log: Path, text: str, after: float, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while (at := log_time(log, text, after)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not in {log} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return at


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--poll", type=float, default=10.0, help="the app's registry_poll_seconds (default 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flagloop-hub-follow-"))
    hub = HubServer(token=TOKEN).start()
    app = None
    rows = []
    try:
        point_hub_client_at(hub.url, work / "bench-hf", EnvPatch())
        from chat_overhead import BrowserLikeClient, assistant_text

        from retrain.registry import HubRegistry
        from space.model import embedded_model_path
        from tests.conftest import start_app
        from tests.test_app_swaps_model import requantize

        import llama_cpp

        embedded = embedded_model_path()
        q8 = requantize(embedded, work / "SmolLM2-135M-Instruct.Q8_0.gguf")
        q5 = requantize(embedded, work / "SmolLM2-135M-Instruct.Q5_1.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1)
        publish(embedded, "v1")
        app = start_app(work / "feedback", work / "app.log", timeout=300, extra_env={
            "FLAGLOOP_REGISTRY_REPO": REPO, "FLAGLOOP_HUB_TOKEN": TOKEN, "HF_HOME": str(work / "app-hf"),
            "FLAGLOOP_REGISTRY_POLL_SECONDS": str(args.poll), "FLAGLOOP_N_THREADS": str(args.threads)})
        client = BrowserLikeClient(app.url)
        print(f"app {app.url} serving v1 from {REPO} on the test Hub {hub.url}; registry poll {args.poll:g} s",
              flush=True)
        steps = [("v2 (Q8_0, new file)", lambda: publish(q8, "v2"), "v2", q8.stat().st_size),
                 ("rollback to v1 (cached)", lambda: HubRegistry(REPO, token=TOKEN).rollback("v1"), "v1", 0),
                 ("v3 (Q5_1, new file)", lambda: publish(q5, "v3"), "v3", q5.stat().st_size)]
        for name, act, version, size in steps:
            time.sleep(args.poll * 0.37)  # land at another point of the poll's period each time
            t_call = time.time()
            act()
            t0 = time.time()
            detected = wait_log(app.log, f"the registry's current version is now {version}", t_call)
            loaded = wait_log(app.log, f"{version} is loaded", t_call)
            served = wait_log(app.log, f"now serving {version}", t_call)
            fetch = fetched_seconds(app.log, version, t_call)
            client.call("clear")
            _, _, final = client.call("chat", "Say hello.", "", 0.0, 0.95, 8, 0)
            answered = bool(assistant_text(final))
            rows.append({"name": name, "publish": t0 - t_call, "detect": detected - t0, "fetch": fetch,
                         "load": loaded - detected - fetch, "served": served - t0, "bytes": size,
                         "answered": answered})
            print(f"{name}: served {served - t0:.1f} s after the publish returned", flush=True)
    finally:
        if app is not None:
            app.kill()
        hub.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    head = (f"{'published':<24} {'MB':>6} {'publish s':>9} {'detect s':>8} {'fetch s':>7} {'load s':>6} "
            f"{'served s':>8} {'other s':>7}  answers")
    print(head)
    print("-" * len(head))
    for r in rows:
        other = r["served"] - r["detect"] - r["fetch"] - r["load"]
        print(f"{r['name']:<24} {r['bytes'] / 1e6:>6.0f} {r['publish']:>9.1f} {r['detect']:>8.2f} {r['fetch']:>7.2f} "
              f"{r['load']:>6.2f} {r['served']:>8.2f} {other:>7.2f}  {'yes' if r['answered'] else 'NO'}")
    print(f"(publish: the training host's commit and tag; detect: from the publish returning to the poll that saw "
          f"it, at most the poll interval {args.poll:g} s; fetch: hf_hub_download; load: sha256 check and llama.cpp; "
          "served: publish returned -> the generator has it; other: the rest, the swap included)")
    return 0 if rows and all(r["answered"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
