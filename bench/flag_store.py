"""Flag store: sustained acknowledged flags/s and save latency, with 1 and with 32 concurrent writers.

``store`` rows: feedback.store.FlagStore used directly, on a folder on the real disk (tmpfs or
ramfs would hide the fsync this is about: the script refuses them). Each writer thread saves
its share of a fixed number of distinct, realistic FlagRecords (three turns of conversation,
reasons, comment, correction), built before the clock starts so that the threads do nothing but
save; a save's latency is the time ``FlagStore.save`` took to return, that is to make the line
durable. A ``disk`` row first shows what one append + fsync costs on this disk, alone.

``app`` rows (``--app``): the same through the real app (``python -m space``): each of 32
gradio_client clients chats one short answer (4 tokens), then saves flags on it over ``/flag``
again and again, each with a new comment, so each save writes a new revision; latency is the
whole API call (client, HTTP, Gradio's queue, handler, fsync), with client and server sharing
this machine's cores; the CPU seconds each side used are printed under the table.

After each run the flags are read back with feedback.reader.read_flags: every acknowledged save
must be on disk exactly once, with nothing else and no bad line ("zero loss"). The folder is
deleted at the end (``--keep`` keeps it).

    .venv/bin/python bench/flag_store.py                 # FlagStore, 1 and 32 writers, 20000 flags each
    .venv/bin/python bench/flag_store.py --app           # and through the app's /flag API
    .venv/bin/python bench/flag_store.py --writers 1 8 32 64 --flags 50000
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from feedback.reader import read_flags
from feedback.store import FlagStore
from schemas.flag import ChatMessage, FlagRecord, GenerationSettings, ModelIdentity

P99_GOAL_MS = 20.0
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}

MODEL = ModelIdentity(
    source="embedded",
    path="/srv/flagloop/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="3f1c8e0a9d5b7c2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e",
    quant="Q4_1",
)
TURNS = [
    ("How do I keep basil alive indoors?",
     ("Basil likes sun and warmth: put it on a south-facing sill, water it when the top centimetre of soil is "
      "dry, and pinch off flower buds so the plant keeps making leaves. Avoid cold drafts below 10 °C.")),
    ("And how often should I fertilise it?",
     ("Feed it every two to four weeks in spring and summer with a balanced liquid fertiliser at half strength; "
      "in winter, when it grows slowly, once a month is enough.")),
    ("Can I grow it from a supermarket pot?",
     ("Yes. Supermarket basil is usually many seedlings crammed together: split the clump into three or four "
      "smaller ones, repot each in fresh compost, and they will last for months instead of days. 🌿")),
]


@dataclass
class Result:
    """What one benchmark run acknowledged, how fast, and what the disk held afterwards."""

    name: str
    writers: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)  # seconds per acknowledged save
    acked: list[tuple] = field(default_factory=list)  # what each save acknowledged (an id on disk)
    fsyncs: int | None = None
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0
    bad_lines: int = 0
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used, by process
    others: float = 0.0  # cores other processes on the machine used on average meanwhile

    @property
    def zero_loss(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected or self.bad_lines or self.errors)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--writers", type=int, nargs="+", default=[1, 32], help="writer threads per run (default: 1 32)")
    p.add_argument("--flags", type=int, default=20_000,
                   help="flags each store run saves, over all writers (default 20000)")
    p.add_argument("--dir", type=Path, default=ROOT / ".bench-tmp" / f"flag-store-{os.getpid()}",
                   help="scratch folder on the disk to measure (default: .bench-tmp/ in the repo); deleted after")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--app", action="store_true", help="also measure through the real app's /flag API")
    p.add_argument("--app-clients", type=int, default=32, help="gradio clients for --app (default 32)")
    p.add_argument("--app-duration", type=float, default=15.0, help="seconds the --app run saves for (default 15)")
    p.add_argument("--fsync-samples", type=int, default=200, help="appends + fsyncs timed alone (default 200)")
    return p.parse_args(argv)


def filesystem_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, filesystem type) of the mount holding ``path``, from /proc/mounts."""
    path = path.resolve()
    best = ("?", "/", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype = line.split()[:3]
        mount = mount.replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[1]):
            best = (device, mount, fstype)
    return best


def realistic_flag(writer: int, n: int) -> FlagRecord:
    """A distinct FlagRecord like one a user saves: three turns, reasons, comment and correction."""
    conversation = []
    for question, answer in TURNS:
        conversation += [ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
    return FlagRecord(
        flag_id=f"w{writer:03d}-{n:07d}-{uuid.uuid4().hex[:8]}",
        session_id=f"session-{writer:03d}",
        conversation_id=f"conversation-{writer:03d}-{n // 10}",
        app_version="bench",
        model=MODEL,
        generation=GenerationSettings(temperature=0.7, top_p=0.95, max_new_tokens=256, seed=writer * 100_000 + n),
        system_prompt="You are a helpful gardening assistant. Answer briefly and concretely.",
        conversation=conversation,
        thumbs="down",
        reasons=["incomplete", "unhelpful"],
        comment=f"Writer {writer}, flag {n}: it never says how much light basil needs in winter, "
                "which is the whole problem in a northern flat.",
        correction=TURNS[-1][1] + " In winter, add a grow light for 12–14 hours a day.",
    )


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


class FsyncCounter:
    """Counts os.fsync calls made while it is active (the store's group commit shares them)."""

    def __init__(self):
        self.count = 0
        self._fsync = os.fsync

    def _counted(self, fd):
        self.count += 1
        return self._fsync(fd)

    def __enter__(self):
        os.fsync = self._counted
        return self

    def __exit__(self, *exc):
        os.fsync = self._fsync


class OthersMeter:
    """How many cores processes other than ``pids`` used on average between start and stop."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def _now(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return time.perf_counter(), busy, sum(process_cpu(p) for p in self.pids)

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        end = self._now()
        self.cores = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / (end[0] - self.start[0])


def bench_disk(folder: Path, samples: int) -> Result:
    """Append one flag-sized line and fsync it, ``samples`` times, alone: the disk's own cost."""
    folder.mkdir(parents=True)
    line = (realistic_flag(0, 0).model_dump_json() + "\n").encode()
    result = Result("disk: append + fsync", 1, 0.0)
    with open(folder / "fsync.jsonl", "ab", buffering=0) as f, OthersMeter([os.getpid()]) as others:
        start = time.perf_counter()
        for _ in range(samples):
            t0 = time.perf_counter()
            f.write(line)
            os.fsync(f.fileno())
            result.latencies.append(time.perf_counter() - t0)
        result.elapsed = time.perf_counter() - start
    result.others = others.cores
    result.acked = [None] * samples
    result.fsyncs = samples
    return result


def bench_store(folder: Path, writers: int, flags: int) -> Result:
    """``writers`` threads saving ``flags`` distinct flags between them into one FlagStore."""
    store = FlagStore(folder)
    batches = [[realistic_flag(w, n) for n in range(flags // writers + (w < flags % writers))] for w in range(writers)]
    latencies: list[list[float]] = [[] for _ in range(writers)]
    acked: list[list[tuple]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        barrier.wait()
        for record in batches[w]:
            t0 = time.perf_counter()
            try:
                saved = store.save(record)
            except OSError as err:  # counted and reported: a failed save is not acknowledged
                errors.append(err)
                continue
            latencies[w].append(time.perf_counter() - t0)
            acked[w].append((saved.record_id,))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    with FsyncCounter() as fsyncs, OthersMeter([os.getpid()]) as others:
        start = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    store.close()
    result = Result(f"store: FlagStore.save, {writers} writer{'s' * (writers > 1)}", writers, elapsed,
                    [x for lat in latencies for x in lat], [a for acks in acked for a in acks],
                    fsyncs.count, errors=len(errors), others=others.cores)
    if errors:
        print(f"  {len(errors)} saves failed, first: {errors[0]!r}")
    check_on_disk(result, folder, lambda r: (r.record_id,))
    return result


def check_on_disk(result: Result, folder: Path, key) -> None:
    """Fill in what reading the folder back finds: acknowledged saves missing or repeated, others, bad lines."""
    read = read_flags(folder)
    on_disk = Counter(key(r) for r in read.records)
    acked = Counter(result.acked)
    result.duplicated = sum(1 for k in acked if on_disk[k] > 1) + sum(1 for k, n in acked.items() if n > 1)
    result.missing = sum(1 for k in acked if on_disk[k] == 0)
    result.unexpected = sum(n for k, n in on_disk.items() if k not in acked)
    result.bad_lines = len(read.bad)


def bench_app(folder: Path, clients: int, duration: float) -> Result:
    """``clients`` gradio clients, each chatting once and then saving revisions of its flag via /flag."""
    from gradio_client import Client

    from tests.conftest import start_app

    folder.mkdir(parents=True)
    app = start_app(folder / "feedback", folder / "app.log")
    try:
        sessions: list = [None] * clients

        def connect(i: int) -> None:
            client = Client(app.url, verbose=False, download_files=False)
            client.predict(f"Say hi to user {i}.", "You are terse.", 0.0, 0.95, 4, i, api_name="/chat")
            sessions[i] = client

        run_threads(connect, clients)
        latencies: list[list[float]] = [[] for _ in range(clients)]
        acked: list[list[tuple]] = [[] for _ in range(clients)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(clients + 1)
        deadline = 0.0
        pids = {"app (server)": app.proc.pid, "bench (clients)": os.getpid()}

        def flagger(i: int) -> None:
            barrier.wait()
            for n in itertools.count():
                if time.perf_counter() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    status = sessions[i].predict(
                        1, ["incomplete", "unhelpful"], f"client {i}, save {n}: too short to be useful",
                        "Hello! How can I help you today?", "👎 down", api_name="/flag",
                    )
                except Exception as err:  # noqa: BLE001  any failed call is counted and reported, not acknowledged
                    errors.append(err)
                    continue
                latencies[i].append(time.perf_counter() - t0)
                flag_id = re.search(r"`([0-9a-f]+)`", status)
                revision = re.search(r"revision (\d+)", status)
                if not flag_id:
                    errors.append(ValueError(f"no flag id in {status!r}"))
                    continue
                acked[i].append((flag_id.group(1), int(revision.group(1)) if revision else 1))

        threads = [threading.Thread(target=flagger, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        cpu0 = {name: process_cpu(pid) for name, pid in pids.items()}
        with OthersMeter(list(pids.values())) as others:
            start = time.perf_counter()
            deadline = start + duration
            barrier.wait()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
        cpu = {name: process_cpu(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        app.kill()  # SIGKILL: whatever the app acknowledged must be on disk already
    result = Result(f"app: /flag via gradio_client, {clients} clients", clients, elapsed,
                    [x for lat in latencies for x in lat], [a for acks in acked for a in acks], errors=len(errors),
                    cpu=cpu, others=others.cores)
    if errors:
        print(f"  {len(errors)} saves failed, first: {errors[0]!r}")
    check_on_disk(result, folder / "feedback", lambda r: (r.flag_id, r.revision))
    return result


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_threads(fn, n: int) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def print_table(results: list[Result]) -> None:
    print(f"\n{'run':<44} {'saves':>7} {'flags/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'fsyncs':>7} {'others':>6}  zero loss")
    for r in results:
        ms = [x * 1000 for x in r.latencies]
        fsyncs = "-" if r.fsyncs is None else str(r.fsyncs)
        loss = ("yes" if r.zero_loss else
                f"NO: {r.missing} missing, {r.duplicated} duplicated, {r.unexpected} unexpected, "
                f"{r.bad_lines} bad lines, {r.errors} errors")
        if r.name.startswith("disk"):
            loss = "-"
        print(f"{r.name:<44} {len(r.acked):>7} {len(r.acked) / r.elapsed:>8.0f} {percentile(ms, 0.5):>7.2f} "
              f"{percentile(ms, 0.99):>7.2f} {max(ms, default=float('nan')):>7.2f} {fsyncs:>7} "
              f"{r.others:>6.2f}  {loss}")
    for r in results:
        if r.cpu:
            used = ", ".join(f"{name} {sec:.1f} s ({sec / r.elapsed:.2f} cores)" for name, sec in r.cpu.items())
            print(f"  {r.name}: CPU used in {r.elapsed:.1f} s: {used}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the app and cleans up
    device, mount, fstype = filesystem_of(args.dir.parent if not args.dir.exists() else args.dir)
    if fstype in MEMORY_FILESYSTEMS:
        print(f"{args.dir} is on {fstype} ({mount}), which has no disk to fsync to: pass --dir on a real disk",
              file=sys.stderr)
        return 2
    if args.dir.exists():
        print(f"{args.dir} exists: pass a --dir that does not, so that only this run's flags are in it",
              file=sys.stderr)
        return 2
    print(f"scratch folder {args.dir} on {device} ({fstype}, mounted on {mount}); cpus {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.2f}")
    parent_made = not args.dir.parent.exists()
    results = []
    try:
        results.append(bench_disk(args.dir / "disk", args.fsync_samples))
        for writers in args.writers:
            print(f"FlagStore, {writers} writer(s), {args.flags} flags ...", flush=True)
            results.append(bench_store(args.dir / f"store-{writers}", writers, args.flags))
        if args.app:
            print(f"app /flag, {args.app_clients} clients, {args.app_duration:g} s ...", flush=True)
            results.append(bench_app(args.dir / "app", args.app_clients, args.app_duration))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            if parent_made:
                try:
                    args.dir.parent.rmdir()
                except OSError:
                    pass
    print_table(results)
    print("\nothers: cores that other processes on the machine used meanwhile (2 cores in all); more than "
          "about 0.2 means the run shared the machine and its figures are worse than the code's")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    ok = all(r.zero_loss for r in results)
    for r in results:
        if r.name.startswith("store") and r.writers >= 32:
            p99 = percentile([x * 1000 for x in r.latencies], 0.99)
            print(f"goal: p99 save latency < {P99_GOAL_MS:g} ms at {r.writers} writers: {p99:.2f} ms -> "
                  f"{'MET' if p99 < P99_GOAL_MS else 'NOT MET'}")
    print(f"zero loss in every run: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
