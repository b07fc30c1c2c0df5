"""Merge: time to turn a feedback folder of 25k / 50k / 100k flags into a run's data (goal: 100k < 10 s).

Writes realistic flags and review decisions as JSONL shards straight into a temporary feedback
folder, shaped as the stores write them (not timed): 1-3 turns of conversation, thumbs, reasons,
comments, a correction on about two thirds of the flags, 2% asking exactly what the flag before
asked (duplicates and conflicting corrections), 10% saved twice (decided on the second revision),
decisions on 90% of the flags (85% accept, some decided twice, a fifth of the accepts with an
edited correction). Then it times ``retrain.merge.run_merge`` with
replay off (``replay_source="none"``: self-replay runs the model, which is not what this measures)
and the base model pinned beforehand (hashing the GGUF does not grow with the flags), and prints
the wall and CPU time per size and the wall time per 1k flags, to show it grows linearly (the CPU
time is the steadier figure on a machine other work shares).

    .venv/bin/python bench/merge.py                      # 25k, 50k and 100k flags
    .venv/bin/python bench/merge.py --sizes 10000 --keep
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrain.merge import base_of, run_merge  # noqa: E402
from schemas.flag import REASONS  # noqa: E402
from schemas.run import MergeConfig, RetrainSettings  # noqa: E402
from schemas.settings import Settings  # noqa: E402

GOAL_S = 10.0
TOPICS = [
    ("How do I keep basil alive indoors?",
     "Basil likes sun and warmth: put it on a south-facing sill and water it when the top of the soil is dry."),
    ("What is the capital of Australia?", "The capital of Australia is Sydney, its largest city."),
    ("Explain recursion to a ten-year-old.",
     ("Recursion is when something is defined in terms of itself, like a set of Russian dolls, each holding a "
      "smaller one, until the smallest doll that holds nothing.")),
    ("How many legs does a spider have?", "A spider has six legs, like every insect."),
    ("Translate 'good morning' into French.", "Bonne nuit."),
    ("¿Cuál es el río más largo del mundo?", "El río más largo del mundo es el Nilo, aunque algunos dicen el Amazonas. 🌊"),
]
CORRECTIONS = ["The capital of Australia is Canberra.", "A spider has eight legs; spiders are not insects.",
               "'Good morning' is 'Bonjour' in French.", None]
MODEL = {"source": "embedded", "repo": None, "revision": None, "path": "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
         "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "3f" * 32, "quant": "Q4_1", "version": None}


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def generate(root: Path, n: int, seed: int = 0) -> tuple[int, int]:
    """Write ``n`` flags and their decisions as shards under ``root``; return (flag lines, decisions)."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    flag_lines, decision_lines = [], []
    conversation: list[dict] = []
    for i in range(n):
        if not conversation or rng.random() >= 0.02:  # else the same question as the flag before
            conversation = []
            for t in range(rng.randint(1, 3)):
                q, a = TOPICS[rng.randrange(len(TOPICS))]
                conversation += [{"role": "user", "content": f"{q} (#{i}.{t})"}, {"role": "assistant", "content": a}]
        created = start + timedelta(seconds=rng.uniform(0, 60 * 86400))
        correction = CORRECTIONS[rng.randrange(len(CORRECTIONS))] if rng.random() < 0.9 else None
        flag = {
            "schema_version": 1, "record_id": uuid.UUID(int=rng.getrandbits(128)).hex, "flag_id": f"{i:024x}",
            "revision": 1, "created_at": iso(created), "updated_at": iso(created), "session_id": f"session-{i // 7}",
            "conversation_id": f"conv-{i // 3}", "app_version": "0.1.0", "model": MODEL,
            "generation": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 256, "seed": rng.randrange(1 << 30)},
            "system_prompt": "You are a helpful assistant.", "conversation": conversation,
            "thumbs": rng.choice(["up", "down", "down", None]), "reasons": rng.sample(REASONS, rng.choice([0, 1, 2])),
            "comment": rng.choice(["", "Wrong.", "It made this up."]), "correction": correction,
        }
        flag_lines.append(orjson.dumps(flag))
        if rng.random() < 0.1:  # saved again later: a second revision, the one reviewers decide on
            flag = {**flag, "revision": 2, "record_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                    "updated_at": iso(created + timedelta(minutes=5)), "comment": flag["comment"] + " (edited)"}
            flag_lines.append(orjson.dumps(flag))
        if rng.random() < 0.9:
            for k in range(1 if rng.random() < 0.9 else 2):
                action = "accept" if rng.random() < 0.85 else "reject"
                edited = f"Edited answer {i}." if action == "accept" and rng.random() < 0.2 else None
                decision_lines.append(orjson.dumps({
                    "schema_version": 1, "decision_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                    "flag_id": flag["flag_id"], "flag_record_id": flag["record_id"], "action": action,
                    "correction": edited, "note": "", "reviewer": rng.choice(["ana", "bo"]),
                    "created_at": iso(created + timedelta(days=1, minutes=k)),
                }))
    for sub, prefix, lines in (("flags", "flags", flag_lines), ("reviews", "reviews", decision_lines)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        per_shard = 20_000  # about the 16 MiB the stores rotate at
        for s in range(0, len(lines), per_shard):
            (root / sub / f"{prefix}-20260101-bench-1-{s // per_shard + 1}.jsonl").write_bytes(
                b"\n".join(lines[s : s + per_shard]) + b"\n")
    return len(flag_lines), len(decision_lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()
    # run_merge's summary line (rows per file, read / rows / write seconds) under each size's figures.
    logging.basicConfig(level=logging.WARNING, format="    %(message)s")
    logging.getLogger("retrain.merge").setLevel(logging.INFO)

    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None))
    base = base_of(Settings())
    print(f"{'flags':>8} {'lines':>8} {'decisions':>9} {'MiB':>6} {'merge s':>8} {'cpu s':>6} {'ms/1k flags':>11} "
          f"{'train':>6} {'heldout':>7} {'pref':>6} {'kto':>6} {'left out':>8}")
    result = {}
    try:
        for n in args.sizes:
            feedback = tmp / f"feedback-{n}"
            # In a child process, so that this process's peak RSS is the merge's own.
            with multiprocessing.get_context("fork").Pool(1) as pool:
                lines, decisions = pool.apply(generate, (feedback, n))
            mib = sum(p.stat().st_size for p in feedback.rglob("*.jsonl")) / 2**20
            settings = Settings(feedback_dir=feedback, retrain=RetrainSettings(merge=MergeConfig(replay_source="none")))
            t, cpu = time.perf_counter(), time.process_time()
            manifest = run_merge(settings, tmp / f"run-{n}", base=base)
            dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
            result[n] = dt
            c = manifest.counts
            print(f"{n:>8,} {lines:>8,} {decisions:>9,} {mib:>6.1f} {dt:>8.2f} {dcpu:>6.2f} {dt / n * 1e6:>11.1f} "
                  f"{c['train']:>6,} {c['heldout']:>7,} {c['preference']:>6,} {c['kto']:>6,} {c['left_out']:>8,}",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"peak RSS of the merges (data generated in a child process): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if 100_000 in result:
        ok = "OK" if result[100_000] < GOAL_S else "MISSED"
        print(f"100k flags: {result[100_000]:.2f} s (goal < {GOAL_S:.0f} s): {ok}")


if __name__ == "__main__":
    main()
