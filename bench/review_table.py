"""Review table: time to load and filter 100k flags (goal: load + filter under 2 s on this machine).

Generates realistic flags into a temporary feedback folder first (not timed): 1–3 turns of
conversation, 0–3 reasons, thumbs, comments, corrections, five model versions, created over 60
days, one shard per day as the app writes them, 10% of the flags saved twice (a second revision),
and review decisions on a third of them (some decided twice, the latest wins). Then it times what
the review page does:

- ``load``: read every shard on the fast path (``FlagIndex``: orjson, only the table's fields),
  build the frame, read the decisions and join them (``review_rows``), cold, in a fresh process
  state; ``refresh`` is the same after 100 more flags were appended (only new bytes are read).
- ``filter``: ``filter_rows`` for several filter combinations, each followed by ``table_view``
  of the first page with its text previews (what the page sends to the browser), plus the plots'
  data frames.
- ``page``: the review page's own handlers (space.review.ReviewApp) on the same folder: start,
  login (which also reads the flags), and one accept.
- For comparison, the reader every other tool uses (``latest_flags``: a pydantic FlagRecord per
  line), and a check that both paths give the same latest revision of every flag.

    .venv/bin/python bench/review_table.py              # 100k flags
    .venv/bin/python bench/review_table.py --flags 20000 --keep
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from feedback.plots import flags_per_day_by_reason, flags_per_model_version, status_share  # noqa: E402
from feedback.reader import latest_flags  # noqa: E402
from feedback.review_table import Filters, FlagIndex, filter_rows, review_rows, table_view  # noqa: E402
from feedback.reviews import REVIEWS_SUBDIR, ReviewStore  # noqa: E402
from schemas.flag import REASONS, ChatMessage, FlagRecord, GenerationSettings, ModelIdentity  # noqa: E402
from schemas.review import ReviewDecision  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from space.review import PAGE_ROWS, SCREEN, ReviewApp  # noqa: E402

GOAL_S = 2.0
DAYS = 60
VERSIONS = ["v1", "v2", "v3", "v4", None]
TOPICS = [
    ("How do I keep basil alive indoors?",
     "Basil likes sun and warmth: put it on a south-facing sill and water it when the top of the soil is dry."),
    ("What is the capital of Australia?", "The capital of Australia is Sydney, its largest city."),
    ("Explain recursion to a ten-year-old.",
     "Recursion is when something is defined in terms of itself, like a set of Russian dolls, each holding a "
     "smaller one, until the smallest doll that holds nothing."),
    ("Write a haiku about autumn.", "Leaves fall from the trees / the wind carries them away / autumn is here now"),
    ("How many legs does a spider have?", "A spider has six legs, like every insect."),
    ("Translate 'good morning' into French.", "Bonne nuit."),
    ("Give me a SQL query that counts rows per day.",
     "SELECT date(created_at) AS day, count(*) FROM events GROUP BY day ORDER BY day;"),
    ("¿Cuál es el río más largo del mundo?",
     "El río más largo del mundo es el Nilo, aunque algunos dicen el Amazonas. 🌊"),
]
COMMENTS = ["", "Wrong.", "It made this up.", "Too short, it skips the second half of the question.",
            "Not what I asked <b>at all</b>.", "The answer is fine but the tone is rude."]


def model_identity(version: str | None) -> ModelIdentity:
    return ModelIdentity(
        source="hub" if version else "embedded", repo="flagloop/smollm2-gguf" if version else None,
        revision=("%040x" % hash(version))[-40:] if version else None,
        path="/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=("%064x" % abs(hash(version)))[-64:], quant="Q4_1", version=version,
    )


def make_flags(n: int, rng: random.Random, start: datetime) -> list[FlagRecord]:
    """``n`` distinct realistic flags, created over DAYS days from ``start``."""
    models = {v: model_identity(v) for v in VERSIONS}
    flags = []
    for i in range(n):
        turns = rng.randint(1, 3)
        conversation = []
        for t in range(turns):
            q, a = TOPICS[rng.randrange(len(TOPICS))]
            conversation += [ChatMessage(role="user", content=f"{q} (#{i}.{t})"),
                             ChatMessage(role="assistant", content=a)]
        created = start + timedelta(seconds=rng.uniform(0, DAYS * 86400))
        thumbs = rng.choice(["up", "down", "down", None])
        reasons = rng.sample(REASONS, rng.choice([0, 1, 1, 2, 3]))
        flags.append(FlagRecord(
            flag_id=f"{i:024x}", session_id=f"session-{i // 7}", conversation_id=f"conv-{i // 3}",
            app_version="0.1.0", model=models[rng.choice(VERSIONS)],
            generation=GenerationSettings(seed=rng.randrange(1 << 30)), system_prompt="You are a helpful assistant.",
            conversation=conversation, thumbs=thumbs, reasons=reasons, comment=rng.choice(COMMENTS),
            correction=rng.choice([None, "The capital of Australia is Canberra.", "A spider has eight legs."]),
            created_at=created, updated_at=created,
        ))
    return flags


def write_shards(folder: Path, prefix: str, lines_by_day: dict[str, list[bytes]]) -> None:
    """One shard per UTC day, named like the stores name theirs."""
    folder.mkdir(parents=True, exist_ok=True)
    for day, lines in sorted(lines_by_day.items()):
        (folder / f"{prefix}-{day}-bench-1-1.jsonl").write_bytes(b"".join(lines))


def generate(root: Path, n: int, seed: int = 0) -> tuple[int, int]:
    """Write ``n`` flags (10% with a second revision) and decisions on a third; return (lines, decisions)."""
    rng = random.Random(seed)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=DAYS)
    flags = make_flags(n, rng, start)
    by_day: dict[str, list[bytes]] = {}
    revised = []
    for f in flags:
        by_day.setdefault(f.created_at.strftime("%Y%m%d"), []).append((f.model_dump_json() + "\n").encode())
        if rng.random() < 0.1:
            later = f.updated_at + timedelta(minutes=rng.randint(1, 30))
            second = f.model_copy(update={"revision": 2, "updated_at": later, "record_id": f"{f.record_id[:-1]}2",
                                          "comment": f.comment + " (edited)"})
            by_day.setdefault(later.strftime("%Y%m%d"), []).append((second.model_dump_json() + "\n").encode())
            revised.append(second)
    write_shards(root / "flags", "flags", by_day)
    latest = {f.flag_id: f for f in flags} | {f.flag_id: f for f in revised}
    decisions: dict[str, list[bytes]] = {}
    count = 0
    for f in rng.sample(list(latest.values()), len(latest) // 3):
        for k in range(1 if rng.random() < 0.9 else 2):
            action = rng.choice(["accept", "accept", "reject"])
            at = f.updated_at + timedelta(days=1, minutes=k)
            edited = "Edited by the reviewer." if action == "accept" and rng.random() < 0.2 else None
            d = ReviewDecision(flag_id=f.flag_id, flag_record_id=f.record_id, action=action,
                               reviewer=rng.choice(["ana", "bo"]), created_at=at, correction=edited)
            decisions.setdefault(at.strftime("%Y%m%d"), []).append((d.model_dump_json() + "\n").encode())
            count += 1
    write_shards(root / REVIEWS_SUBDIR, "reviews", decisions)
    return n + len(revised), count


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def load(root: Path) -> tuple[FlagIndex, ReviewStore, object, dict[str, float]]:
    """What the review page does on a cold start: index the flags, read the decisions, join them."""
    took = {}
    t = time.perf_counter()
    index = FlagIndex(root)
    index.refresh()
    frame = index.frame()
    took["flags"] = time.perf_counter() - t
    reviews, took["decisions"] = timed(lambda: ReviewStore(root))
    rows, took["join"] = timed(lambda: review_rows(frame, reviews.latest()))
    took["total"] = sum(took.values())
    return index, reviews, rows, took


def show(index: FlagIndex, rows, f: Filters):
    """What the page computes for a filter: the rows kept, and the table of the first page with their texts."""
    kept = filter_rows(rows, f)
    ids = kept["flag_id"].head(PAGE_ROWS).tolist()
    return kept, table_view(kept, index.texts(ids), PAGE_ROWS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="cold loads to time (the median counts)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder")
    args = parser.parse_args(argv)

    base = ROOT / ".bench-tmp"
    base.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="review-table-", dir=base))
    try:
        (lines, ndecisions), took = timed(lambda: generate(root, args.flags))
        size = sum(p.stat().st_size for p in root.rglob("*.jsonl"))
        print(f"generated {args.flags:,} flags ({lines:,} lines, {size / 2**20:.0f} MiB) and {ndecisions:,} "
              f"decisions in {took:.1f} s under {root}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
              f"python {sys.version.split()[0]}")

        runs = [load(root) for _ in range(args.repeat)]
        index, reviews, rows, _ = runs[-1]
        assert len(rows) == args.flags and not index.bad, (len(rows), index.bad[:3])
        for k, (*_, took) in enumerate(runs, 1):
            print(f"load #{k} {took['total']:6.3f} s   = flags {took['flags']:.3f} s (read, parse, latest revision, "
                  f"frame) + decisions {took['decisions']:.3f} s (ReviewStore, pydantic) + join {took['join']:.3f} s")
        t_load = sorted(took["total"] for *_, took in runs)[len(runs) // 2]
        print(f"load  {t_load:6.3f} s (median)  {len(rows):,} flags, "
              f"{(rows.status == 'pending').sum():,} pending / {(rows.status == 'accepted').sum():,} accepted / "
              f"{(rows.status == 'rejected').sum():,} rejected")

        today = date.today()
        cases = {
            "no filter": Filters(),
            "pending": Filters.of(statuses=["pending"]),
            "reason incorrect|hallucinated": Filters.of(reasons=["incorrect", "hallucinated"]),
            "thumbs down, model v2": Filters.of(thumbs=["down"], model_versions=["v2"]),
            "last 7 days": Filters.of(start=today - timedelta(days=7), end=today),
            "all five at once": Filters.of(reasons=["incorrect"], statuses=["pending"], model_versions=["v1", "v3"],
                                           thumbs=["down", "none"], start=today - timedelta(days=30), end=today),
        }
        worst = 0.0
        for name, f in cases.items():
            index._texts.clear()  # each filter reads its shown rows' texts afresh
            (kept, view), t = timed(lambda f=f: show(index, rows, f))
            worst = max(worst, t)
            print(f"filter {t * 1000:6.1f} ms  {name:32s} -> {len(kept):,} rows ({len(view)} shown)")
        _, t_plots = timed(lambda: (flags_per_day_by_reason(rows), status_share(rows), flags_per_model_version(rows)))
        print(f"plots  {t_plots * 1000:6.1f} ms  flags/day by reason, status share, flags per model version")

        more = make_flags(100, random.Random(1), datetime.now(timezone.utc))
        with open(root / "flags" / "flags-99999999-bench-2-1.jsonl", "wb") as f:
            f.write(b"".join((r.model_dump_json() + "\n").encode() for r in more))
        _, t_refresh = timed(lambda: (index.refresh(), review_rows(index.frame(), reviews.refresh())))
        print(f"refresh {t_refresh:5.3f} s   after 100 more flags were appended (only new bytes read, frame rebuilt, "
              f"joined again)")
        _, t_idle = timed(lambda: (index.refresh(), review_rows(index.frame(), reviews.refresh())))
        print(f"refresh {t_idle:5.3f} s   with nothing new (what every click of the review page costs)")

        app, t_app = timed(lambda: ReviewApp(Settings(feedback_dir=root, reviewers={"bench": "pw"})))
        pending = ([], ["pending"], [], [], "", "")
        screen, t_login = timed(lambda: dict(zip(SCREEN, app.login("bench", "pw", *pending))))
        _, t_accept = timed(lambda: app.accept(screen["reviewer"], screen["current"], screen["correction"], "",
                                               *pending))
        app.close()
        print(f"page  app start {t_app:.3f} s (decisions read) · login {t_login:.3f} s (flags read, table, plots, "
              f"first flag) · accept {t_accept:.3f} s (decision fsynced, table, plots, next flag)")

        total = t_load + worst
        print(f"\nload + slowest filter: {total:.3f} s (goal < {GOAL_S} s): {'OK' if total < GOAL_S else 'TOO SLOW'}")

        slow, t_slow = timed(lambda: latest_flags(root))
        frame = index.frame()
        fast = dict(zip(frame["flag_id"], frame["record_id"]))
        same = fast == {fid: r.record_id for fid, r in slow.records.items()}
        print(f"\nfor comparison, latest_flags (pydantic FlagRecord per line): {t_slow:.3f} s; "
              f"same latest revision of every flag on both paths: {same}")
        return 0 if total < GOAL_S and same else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
