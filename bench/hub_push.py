"""Hub push: how fast FolderPusher sends the flag shards, and how long a saved flag takes to reach the Hub.

Both parts push to tests/hubserver.py's Hub-protocol server on 127.0.0.1, driven by the real
huggingface_hub client (Xet off, so files over 10 MiB go through the LFS protocol, as the server
has no Xet storage), with a token as on the real Hub. The server holds everything in memory and
shares this machine's cores with the client, so the figures are the client's and the protocol's
cost with no network in between: a lower bound for the real Hub, where round trips add up.

``push`` rows: N distinct, realistic FlagRecords (two turns of conversation, reasons, comment,
correction) are saved with feedback.store.FlagStore into a temporary folder (saving is not timed;
16 writer threads share the fsyncs), then timed:

- ``first push``: one FolderPusher.push() of all of them to a new repo (creating it, writing the
  dataset card, one part file per shard): records/s and MB/s of shard bytes; the median of --runs
  pushes, each by a new pusher to a fresh repo (the machine is shared: one run alone is noisy).
  The card is built once before the clock starts, since its first build imports `datasets`
  (about a second, once per process; printed on its own line);
- ``nothing new``: a second push() of the same pusher, with nothing to send (a HEAD, no commit);
- ``incremental``: --more new records saved, then push() again: only their bytes go, as new files.

Each row checks what the server holds afterwards: every local record id in the part files, once.

``save->Hub`` row: a HubSync (the app's scheduler: a push every --interval seconds) on another
folder and repo; --repeats times, after a random pause (so saves fall at random points of the
timer's period), one flag is saved and the server's memory (HubServer.files) is polled every 10 ms
until its record id is there. The time from calling FlagStore.save to seeing it on the Hub is
dominated by the interval: on average about interval/2 of waiting for the next tick, plus the
fsync and one push.

    .venv/bin/python bench/hub_push.py
    .venv/bin/python bench/hub_push.py --records 50000 --more 2000 --interval 2 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hubserver import HubServer, point_hub_client_at

TOKEN = "hf_benchPUSHtoken0123456789abcdef"
PUSH_REPO = "flagloop-bench/push"
LATENCY_REPO = "flagloop-bench/latency"
SAVE_THREADS = 16
POLL_S = 0.01

TURNS = [
    ("How do I keep basil alive indoors?",
     ("Basil likes sun and warmth: put it on a south-facing sill, water it when the top centimetre of soil is "
      "dry, and pinch off flower buds so the plant keeps making leaves. Avoid cold drafts below 10 °C.")),
    ("And how often should I fertilise it?",
     ("Feed it every two to four weeks in spring and summer with a balanced liquid fertiliser at half strength; "
      "in winter, when it grows slowly, once a month is enough.")),
]


class EnvPatch:
    """Stands in for pytest's monkeypatch in point_hub_client_at: sets for good, since this process ends after."""

    def setenv(self, name: str, value: str) -> None:
        os.environ[name] = value

    def delenv(self, name: str, raising: bool = True) -> None:
        os.environ.pop(name, None)

    def setattr(self, target, name: str, value) -> None:
        setattr(target, name, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20_000, help="flags saved before the first push (default 20000)")
    p.add_argument("--more", type=int, default=1_000, help="flags saved before the incremental push (default 1000)")
    p.add_argument("--runs", type=int, default=3, help="first pushes, each to a fresh repo; the median is shown "
                   "(default 3)")
    p.add_argument("--interval", type=float, default=1.0, help="HubSync's push interval in seconds (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="flags timed from save to the Hub (default 10)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return p.parse_args(argv)


def realistic_flag(n: int):
    """A distinct FlagRecord like one a user saves: two turns, reasons, comment and correction."""
    from schemas.flag import ChatMessage, FlagRecord, GenerationSettings, ModelIdentity

    conversation = []
    for question, answer in TURNS:
        conversation += [ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
    return FlagRecord(
        flag_id=f"bench-{n:07d}-{uuid.uuid4().hex[:8]}",
        session_id=f"session-{n // 50:05d}",
        conversation_id=f"conversation-{n // 5:06d}",
        app_version="bench",
        model=ModelIdentity(source="embedded", path="/srv/flagloop/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                            file="SmolLM2-135M-Instruct.Q4_1.gguf", sha256="3f1c" * 16, quant="Q4_1"),
        generation=GenerationSettings(temperature=0.7, top_p=0.95, max_new_tokens=256, seed=n),
        system_prompt="You are a helpful gardening assistant. Answer briefly and concretely.",
        conversation=conversation,
        thumbs="down",
        reasons=["incomplete", "unhelpful"],
        comment=f"Flag {n}: it never says how much light basil needs in winter, which is the whole problem.",
        correction=TURNS[-1][1] + " In winter, add a grow light for 12–14 hours a day.",
    )


def save_many(store, first: int, count: int) -> None:
    """Save `count` new flags (numbered from `first`) with SAVE_THREADS threads sharing the fsyncs."""
    records = [realistic_flag(first + i) for i in range(count)]

    def writer(k: int) -> None:
        for record in records[k::SAVE_THREADS]:
            store.save(record)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(SAVE_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def hub_ids(hub: HubServer, repo: str) -> Counter:
    """How many times each record id is in the repo's flag part files, from the server's memory."""
    from feedback.sync import parse_part

    ids = Counter()
    if ("dataset", repo) not in hub.repos:
        return ids
    for path, data in hub.files(repo, "dataset").items():
        parsed = parse_part(path)
        if parsed and parsed[0] == "flags":
            ids.update(json.loads(line)["record_id"] for line in data.splitlines())
    return ids


def check_exactly_once(hub: HubServer, repo: str, root: Path) -> str:
    """'ok' when the repo holds every local record id exactly once (and nothing else), else what is wrong."""
    from feedback.reader import read_flags

    local = Counter(r.record_id for r in read_flags(root).records)
    there = hub_ids(hub, repo)
    if there == local:
        return "ok"
    return f"WRONG: {len(local - there)} missing, {sum((there - local).values())} extra"


def shard_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "flags").glob("*.jsonl"))


def timed_push(hub: HubServer, pusher, root: Path, name: str, expected: int, nbytes: int) -> dict:
    """One push(), timed, with what it sent and whether the Hub then holds each local record once."""
    before = len(hub.requests)
    t0 = time.perf_counter()
    result = pusher.push()
    elapsed = time.perf_counter() - t0
    calls = hub.requests[before:]
    commits = [r for r in calls if r.method == "POST" and "/commit/" in r.path]
    return {"name": name, "records": result.records["flags"], "expected": expected, "bytes": nbytes,
            "seconds": elapsed, "commits": len(result.commits), "files": sum(len(r.ndjson()) - 1 for r in commits),
            "lfs": sum(1 for r in calls if r.method == "PUT" and "/lfs-upload/" in r.path), "requests": len(calls),
            "check": check_exactly_once(hub, pusher.repo_id, root)}


def bench_push(hub: HubServer, root: Path, records: int, more: int, runs: int) -> tuple[list[dict], list[float]]:
    """Time first pushes of `records` flags (`runs` fresh repos), a push with nothing new, and one of `more` new.

    Returns the rows (the first push's is the median run) and every first push's seconds.
    """
    from huggingface_hub import HfApi

    from feedback.store import FlagStore
    from feedback.sync import FolderPusher, dataset_card

    store = FlagStore(root)
    try:
        t = time.perf_counter()
        save_many(store, 0, records)
        print(f"saved {records} flags in {time.perf_counter() - t:.1f} s ({shard_bytes(root) / 1e6:.1f} MB "
              f"in {len(list((root / 'flags').glob('*.jsonl')))} shards); pushing...", flush=True)
        t = time.perf_counter()
        dataset_card(PUSH_REPO)  # the first call imports `datasets`: a one-time cost, kept out of the push rows
        print(f"building the dataset card the first time (importing datasets): {time.perf_counter() - t:.2f} s",
              flush=True)
        firsts = []
        for k in range(runs):
            pusher = FolderPusher(HfApi(token=TOKEN), f"{PUSH_REPO}-{k + 1}", root)
            firsts.append(timed_push(hub, pusher, root, "first push", records, shard_bytes(root)))
        first = sorted(firsts, key=lambda r: r["seconds"])[len(firsts) // 2]
        wrong = [r for r in firsts if r["check"] != "ok" or r["records"] != records]
        if wrong:  # every first push, not only the median one, must have sent everything exactly once
            first = {**first, "records": wrong[0]["records"], "check": wrong[0]["check"]}
        rows = [first, timed_push(hub, pusher, root, "nothing new", 0, 0)]
        pushed = shard_bytes(root)
        save_many(store, records, more)
        rows.append(timed_push(hub, pusher, root, "incremental", more, shard_bytes(root) - pushed))
    finally:
        store.close()
    return rows, [r["seconds"] for r in firsts]


def bench_latency(hub: HubServer, root: Path, interval_s: float, repeats: int) -> list[float]:
    """Seconds from FlagStore.save to the record on the Hub, through a HubSync pushing every interval_s."""
    from feedback.store import FlagStore
    from feedback.sync import HubSync

    store = FlagStore(root)
    sync = HubSync(LATENCY_REPO, root, token=TOKEN, every=interval_s / 60)
    seconds = []
    try:
        deadline = time.monotonic() + 30
        while ("dataset", LATENCY_REPO) not in hub.repos:  # the first tick creates the repo
            if time.monotonic() > deadline:
                raise RuntimeError(f"HubSync did not create the repo: {sync.status().line()}")
            time.sleep(POLL_S)
        for i in range(repeats):
            time.sleep(random.uniform(0, interval_s))  # a random point of the timer's period
            t0 = time.perf_counter()
            record_id = store.save(realistic_flag(10_000_000 + i)).record_id
            limit = time.monotonic() + max(30, 5 * interval_s)
            while record_id not in hub_ids(hub, LATENCY_REPO):
                if time.monotonic() > limit:
                    raise RuntimeError(f"flag {i} not on the Hub after {limit} s: {sync.status().line()}")
                time.sleep(POLL_S)
            seconds.append(time.perf_counter() - t0)
    finally:
        sync.shutdown(timeout=10)
        store.close()
    return seconds


def print_push_table(rows: list[dict], firsts: list[float]) -> None:
    print()
    head = (f"{'push':<12} {'records':>8} {'MB':>7} {'seconds':>8} {'records/s':>10} {'MB/s':>7} "
            f"{'commits':>7} {'files':>5} {'LFS':>4} {'requests':>8}  Hub has each record once")
    print(head)
    print("-" * len(head))
    for r in rows:
        rate = f"{r['records'] / r['seconds']:,.0f}" if r["records"] else "-"
        mbs = f"{r['bytes'] / 1e6 / r['seconds']:.1f}" if r["bytes"] else "-"
        count = f"{r['records']}" + ("" if r["records"] == r["expected"] else f" (expected {r['expected']})")
        print(f"{r['name']:<12} {count:>8} {r['bytes'] / 1e6:>7.2f} {r['seconds']:>8.3f} {rate:>10} {mbs:>7} "
              f"{r['commits']:>7} {r['files']:>5} {r['lfs']:>4} {r['requests']:>8}  {r['check']}")
    print(f"(first push: the median of {len(firsts)} to fresh repos, seconds "
          f"{', '.join(f'{s:.3f}' for s in firsts)}; the other rows push to the last of them)")
    print("(files: files written by the commits, the dataset card included; LFS: of them uploaded through LFS,"
          " i.e. 10 MiB or more; requests: HTTP requests the server got during the push)")


def print_latency_table(seconds: list[float], interval_s: float) -> None:
    print()
    head = f"{'save->Hub':<12} {'interval s':>10} {'n':>4} {'median s':>9} {'mean s':>7} {'min s':>6} {'max s':>6}"
    print(head)
    print("-" * len(head))
    print(f"{'HubSync':<12} {interval_s:>10g} {len(seconds):>4} {statistics.median(seconds):>9.3f} "
          f"{statistics.mean(seconds):>7.3f} {min(seconds):>6.3f} {max(seconds):>6.3f}")
    print(f"(expected about interval/2 = {interval_s / 2:g} s on average, plus a save's fsync and one push; "
          f"at most about one interval plus a push)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flagloop-hub-push-"))
    hub = HubServer(token=TOKEN).start()
    try:
        point_hub_client_at(hub.url, work / "hf_home", EnvPatch())
        from feedback.sync import install_http_timeout

        install_http_timeout()
        print(f"test Hub at {hub.url}; scratch folder {work}", flush=True)
        rows, firsts = bench_push(hub, work / "push", args.records, args.more, args.runs)
        print_push_table(rows, firsts)
        print(f"\ntiming save -> Hub: {args.repeats} flags, HubSync every {args.interval:g} s...", flush=True)
        seconds = bench_latency(hub, work / "latency", args.interval, args.repeats)
        print_latency_table(seconds, args.interval)
        ok = all(r["check"] == "ok" and r["records"] == r["expected"] for r in rows)
    finally:
        hub.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
