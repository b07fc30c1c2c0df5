"""Hub pull: the training host's tick bringing its feedback folder up to date from a dataset repo of 100k flags.

An app's feedback folder (host A) gets --records realistic FlagRecords (bench/hub_push.py's), saved
and pushed --pushes times in equal slices, as a Space pushing every few minutes would leave the
repo: one part file per shard per push, several shards (rotated at 16 MiB). Then, on a second
folder (host B), feedback.pull.pull_folder, as the tick calls it (retrain/follow.py):

- ``first pull``: the empty folder gets everything (every part downloaded);
- ``idle``: nothing new on the Hub (goal: under 1 s, one or two requests);
- ``1000 new``: --more new flags saved and pushed on A, then pulled (goal: under 3 s).

Each row checks that B's shards are byte for byte A's and counts the HTTP requests the server got
and the part files downloaded. The server is tests/hubserver.py on 127.0.0.1 (the real huggingface_hub
client, a token, no network in between, the server sharing this machine's two cores): the round
trips of the real Hub come on top, about one per request.

    .venv/bin/python bench/hub_pull.py
    .venv/bin/python bench/hub_pull.py --records 20000 --pushes 20 --more 1000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hub_push import TOKEN, EnvPatch, save_many  # noqa: E402

from tests.hubserver import HubServer, point_hub_client_at  # noqa: E402

REPO = "flagloop-bench/pull"


def shards(root: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes()
            for sub in ("flags", "reviews") for p in sorted((root / sub).glob("*.jsonl"))}


def timed_pull(hub: HubServer, to: Path, name: str, source: Path) -> dict:
    from huggingface_hub import HfApi

    from feedback.pull import pull_folder

    before = len(hub.requests)
    t0 = time.perf_counter()
    result = pull_folder(HfApi(token=TOKEN), REPO, to)
    seconds = time.perf_counter() - t0
    calls = hub.requests[before:]
    return {"name": name, "seconds": seconds, "records": result.records, "shards": len(result.shards),
            "requests": len(calls), "downloads": sum(1 for r in calls if r.method == "GET" and "/resolve/" in r.path),
            "check": "ok" if shards(to) == shards(source) else "WRONG: B's shards differ from A's",
            "problems": result.problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="flags on the Hub before the first pull")
    p.add_argument("--pushes", type=int, default=100, help="pushes they arrive in (one part per shard each)")
    p.add_argument("--more", type=int, default=1_000, help="new flags before the last pull")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flagloop-hub-pull-"))
    hub = HubServer(token=TOKEN).start()
    try:
        point_hub_client_at(hub.url, work / "hf_home", EnvPatch())
        from huggingface_hub import HfApi

        from feedback.store import FlagStore
        from feedback.sync import FolderPusher, install_http_timeout

        install_http_timeout()
        app, host = work / "a", work / "b"
        store = FlagStore(app)
        pusher = FolderPusher(HfApi(token=TOKEN), REPO, app)
        t = time.perf_counter()
        step = args.records // args.pushes
        for k in range(args.pushes):
            save_many(store, k * step, step)
            pusher.push()
        on_hub = [p for p in hub.files(REPO, "dataset") if p.count("/") == 2]
        print(f"{args.records} flags saved and pushed in {args.pushes} pushes ({time.perf_counter() - t:.0f} s): "
              f"{sum(len(v) for v in shards(app).values()) / 1e6:.0f} MB in {len(shards(app))} shards, "
              f"{len(on_hub)} part files on the Hub at {hub.url}", flush=True)
        rows = [timed_pull(hub, host, "first pull", app), timed_pull(hub, host, "idle", app)]
        save_many(store, args.records, args.more)
        pusher.push()
        rows.append(timed_pull(hub, host, f"{args.more} new", app))
        store.close()
    finally:
        hub.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    head = f"{'pull':<12} {'seconds':>8} {'records':>8} {'shards':>6} {'requests':>8} {'downloads':>9}  B == A"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<12} {r['seconds']:>8.3f} {r['records']:>8} {r['shards']:>6} {r['requests']:>8} "
              f"{r['downloads']:>9}  {r['check']}" + (f"  problems: {r['problems']}" if r["problems"] else ""))
    print("(requests: HTTP requests the server got during the pull; downloads: part files fetched, each a HEAD "
          "and a GET; goals: idle < 1 s with one or two requests, 1000 new < 3 s)")
    return 0 if all(r["check"] == "ok" and not r["problems"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
