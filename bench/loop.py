"""The whole loop on the embedded model: accepted flags to a served new version, stage by stage.

Writes the fictional-fact flags of tests/test_retrain_loop.py (each flagged phrasing with a
correction, accepted) into a temporary feedback folder, runs the pipeline (merge, train, gate,
refit, export, publish) with the default settings, as that test does, then starts serving the
published GGUF the way the app's registry watcher does (load it in llama-cpp-python) and asks a
phrasing that was never flagged. bench/probe.py measures what the defaults learn and keep.
Prints the seconds of each stage and the total (goal: under 10 minutes on this machine).

    .venv/bin/python bench/loop.py
    .venv/bin/python bench/loop.py --max-steps 40 --keep /tmp/loop-run
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_stages(settings, run_id: str, times: dict[str, float], note_chars: int):
    """Run (or continue) ``run_id`` stage by stage, timing each into ``times`` and printing a line per stage;
    the last RunState (the gate's, when it refused)."""
    from retrain import pipeline
    from schemas.run import STAGES

    for stage in STAGES:
        t0 = time.perf_counter()
        state = pipeline.run_pipeline(settings, run_id=run_id, stop_after=stage)
        times[stage] = time.perf_counter() - t0
        print(f"{stage:<8} {times[stage]:>7.1f} s   {state.message[:note_chars]}", flush=True)
        if state.verdict == "refused":
            break
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, help="training steps (default: the default setting, 60)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", type=Path, help="keep the run's folders here instead of a temporary folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import llama_cpp

    from retrain import pipeline
    from retrain.registry import LocalRegistry
    from schemas.run import RetrainSettings, TrainConfig
    from schemas.settings import Settings
    from tests.test_retrain_loop import FACTS, NEVER_FLAGGED, SYSTEM, flagged_corrections, greedy

    root = Path(args.keep or tempfile.mkdtemp(prefix="flagloop-loop-"))
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        feedback_dir=root / "feedback", registry_dir=root / "registry", system_prompt=SYSTEM, n_threads=args.threads,
        retrain=RetrainSettings(runs_dir=str(root / "runs"),
                                train=TrainConfig(**({"max_steps": args.max_steps} if args.max_steps else {}))),
    )
    flagged_corrections(settings.feedback_dir)
    cache = root / "cache" / "base"
    had_base = cache.exists()
    run_id = pipeline.new_run_id()
    times: dict[str, float] = {}
    start = time.perf_counter()
    state = timed_stages(settings, run_id, times, note_chars=90)
    if state.verdict == "refused":
        print("the gate refused the model: no version to serve")
        return 1
    t0 = time.perf_counter()
    current = LocalRegistry(settings.registry_dir).current_path()
    llm = llama_cpp.Llama(str(current), n_ctx=512, n_threads=args.threads, verbose=False)
    times["load"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    question = NEVER_FLAGGED[0].format(c=next(iter(FACTS)))
    print(f"{'load':<8} {times['load']:>7.1f} s   the published GGUF, as the app's registry watcher loads it")
    print(f"{'total':<8} {total:>7.1f} s   flags to a served new version "
          f"({'including' if not had_base else 'base already'} materialised"
          f"{' once: GGUF -> safetensors' if not had_base else ''}); goal < 600 s -> "
          f"{'MET' if total < 600 else 'NOT MET'}")
    print(f"never flagged: {question!r} -> {greedy(llm, question)!r}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
