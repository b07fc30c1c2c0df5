"""Does a retrained version learn what reviewers accepted, and keep everything else? (issue 12)

Flags every 'flagged' phrasing of the facts in bench/probe_suite.json with the model's own
(greedy) answer and the fact's correction, accepts each, runs `retrain run`'s pipeline with the
default settings (only the folders and the thread count set, plus any --set), then asks the
published GGUF, in llama-cpp-python, greedily (first 48 new tokens):
- the held-out phrasings (never flagged): does the answer hold the fact?
- the flagged phrasings themselves: is each accepted correction's own prompt answered right?
- the unrelated prompts: is the answer exactly that of a zero-LoRA export at the same type?
Greedy as the gate and export's checks decode (retrain.export.gguf_answers: temperature 0, no repeat
penalty).
Prints the three rates, the stage times, and every unrelated answer that changed.

    .venv/bin/python bench/probe.py                                 # the defaults
    .venv/bin/python bench/probe.py --set train.learning_rate=1e-3 --set train.max_steps=40
    .venv/bin/python bench/probe.py --keep /tmp/probe --json /tmp/probe.json
    .venv/bin/python bench/probe.py --merged /tmp/probe/runs/run-…   # reuse that run's merge (its data files)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUITE = Path(__file__).with_name("probe_suite.json")
MAX_TOKENS = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a retrain setting, e.g. train.max_steps=40 (value read as JSON, else as text)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", type=Path, help="keep the folders here instead of a temporary folder")
    p.add_argument("--merged", type=Path, help="a finished run folder whose merge outputs to reuse (skips the merge)")
    p.add_argument("--json", type=Path, help="also write the figures and answers here")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "flagloop-probe-cache",
                   help="where the zero-LoRA reference export and the materialised base are kept between runs")
    return p.parse_args(argv)


def retrain_settings(runs_dir: Path, overrides: list[str]):
    """RetrainSettings: the defaults, the runs folder, and each STAGE.KEY=VALUE override."""
    from schemas.run import RetrainSettings

    data: dict = {"runs_dir": str(runs_dir)}
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return RetrainSettings.model_validate(data)


def has_fact(answer: str, expect: list[str]) -> bool:
    lowered = answer.lower()
    return any(e.lower() in lowered for e in expect)


def write_flags(settings, suite: dict, gguf: Path, threads: int) -> int:
    """Each flagged phrasing flagged with the model's own answer and the fact's correction, then accepted."""
    from feedback.reviews import ReviewStore
    from feedback.store import FlagStore
    from schemas.flag import ChatMessage, FlagRecord, GenerationSettings, ModelIdentity
    from retrain.export import chat
    from schemas.review import ReviewDecision
    from space.model import open_llama, sha256_of

    llm = open_llama(gguf, 2048, threads)
    identity = ModelIdentity(source="embedded", path=str(gguf), file=gguf.name, sha256=sha256_of(gguf),
                             quant="Q4_1")
    flags, reviews = FlagStore(settings.feedback_dir), ReviewStore(settings.feedback_dir)
    n = 0
    try:
        for f, fact in enumerate(suite["facts"]):
            for i, prompt in enumerate(fact["flagged"]):
                llm.reset()
                answer = llm.create_chat_completion(chat(prompt, settings.system_prompt), temperature=0.0,
                                                    max_tokens=128, seed=0)["choices"][0]["message"]["content"] or ""
                flag = flags.save(FlagRecord(
                    flag_id=f"probe-{f}-{i}", session_id="probe", conversation_id=f"probe-{f}-{i}",
                    app_version="bench", model=identity,
                    generation=GenerationSettings(temperature=0.0, max_new_tokens=128, seed=0),
                    system_prompt=settings.system_prompt,
                    conversation=[ChatMessage(role="user", content=prompt), ChatMessage(role="assistant", content=answer)],
                    thumbs="down", reasons=["incorrect"], correction=fact["correction"],
                ))
                reviews.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action="accept",
                                              reviewer="probe"))
                n += 1
    finally:
        flags.close()
        reviews.close()
        llm.close()
    return n


def reuse_merge(settings, run_dir: Path, merged: Path) -> None:
    """Copy a finished merge into ``run_dir``, pinned with this run's settings, so the pipeline goes on from train."""
    from retrain.run_files import read_manifest, write_state
    from schemas.run import RunState

    run_dir.mkdir(parents=True)
    shutil.copytree(merged / "data", run_dir / "data")
    shutil.copy(merged / "merge_report.json", run_dir / "merge_report.json")
    manifest = read_manifest(merged).model_copy(update={"run_id": run_dir.name, "settings": settings.retrain})
    (run_dir / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    write_state(run_dir, RunState(run_id=run_dir.name, stage_done="merge"))


def measure(gguf: Path, reference: Path, suite: dict, system: str, threads: int) -> dict:
    """Greedy answers of the published file (and the reference for unrelated prompts), scored."""
    from retrain.export import gguf_answers

    sides = [(f, side, prompt) for f in suite["facts"] for side in ("heldout", "flagged") for prompt in f[side]]
    unrelated = [u["prompt"] for u in suite["unrelated"]]
    answers = gguf_answers(gguf, [p for _, _, p in sides] + unrelated, MAX_TOKENS, threads, system)
    before = gguf_answers(reference, unrelated, MAX_TOKENS, threads, system)
    facts = {id(f): {"kind": f["kind"], "expect": f["expect"], "heldout": [], "flagged": []} for f in suite["facts"]}
    for (fact, side, prompt), answer in zip(sides, answers):
        facts[id(fact)][side].append({"prompt": prompt, "answer": answer, "hit": has_fact(answer, fact["expect"])})
    facts = list(facts.values())
    after = answers[len(sides):]
    unrelated = [{"kind": u["kind"], "prompt": u["prompt"], "reference": b, "answer": a, "same": a == b}
                 for u, b, a in zip(suite["unrelated"], before, after)]

    def rate(side: str) -> tuple[int, int]:
        items = [x for f in facts for x in f[side]]
        return sum(x["hit"] for x in items), len(items)

    return {"heldout": rate("heldout"), "flagged": rate("flagged"),
            "unrelated": (sum(u["same"] for u in unrelated), len(unrelated)), "facts": facts,
            "unrelated_answers": unrelated}


def pct(pair) -> str:
    hits, total = pair
    return f"{hits}/{total} ({100 * hits / total:.0f} %)" if total else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from bench.loop import timed_stages
    from retrain import pipeline
    from retrain.registry import LocalRegistry
    from retrain.run_files import read_manifest
    from schemas.settings import Settings
    from space.model import resolve_model

    suite = json.loads(SUITE.read_text(encoding="utf-8"))
    root = Path(args.keep or tempfile.mkdtemp(prefix="flagloop-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    retrain = retrain_settings(root / "runs", args.overrides)
    settings = Settings(feedback_dir=root / "feedback", registry_dir=root / "registry", n_threads=args.threads,
                        retrain=retrain)
    # The materialised base is kept across runs in the cache (pipeline.base_weights puts it beside runs_dir).
    (root / "cache").mkdir(exist_ok=True)
    if not (root / "cache" / "base").exists():
        (args.cache / "base").mkdir(exist_ok=True)
        (root / "cache" / "base").symlink_to(args.cache / "base", target_is_directory=True)
    serving = resolve_model(settings).path
    changed = {k: v for k, v in retrain.model_dump(exclude_defaults=True).items() if k != "runs_dir"}
    print(f"settings: {'defaults' if not changed else 'defaults but ' + json.dumps(changed)}", flush=True)

    times: dict[str, float] = {}
    run_id = pipeline.new_run_id()
    run_dir = pipeline.run_dir_of(settings, run_id)
    t0 = time.perf_counter()
    if args.merged:
        reuse_merge(settings, run_dir, args.merged)
        print(f"merge reused from {args.merged}")
    else:
        n = write_flags(settings, suite, serving, args.threads)
        times["flags"] = time.perf_counter() - t0
        print(f"{'flags':<8} {times['flags']:>7.1f} s   {n} flagged and accepted", flush=True)
    start = time.perf_counter()
    state = timed_stages(settings, run_id, times, note_chars=150)
    loop_s = time.perf_counter() - start
    manifest = read_manifest(run_dir)
    base = pipeline.base_weights(settings, manifest)
    published = LocalRegistry(settings.registry_dir).current_path() if state.verdict == "publish" else None
    if published is None:
        # Refused: export it anyway, to see what the gate kept from users.
        from retrain import replay
        from retrain.export import export

        print("refused: exporting the adapter anyway, to measure it")
        published = Path(export(base, run_dir / "adapter", Path(manifest.base.path), run_dir / "export",
                                manifest.settings.export, replay.drift_prompts(0), threads=args.threads,
                                base_from_serving=manifest.settings.train.base_model is None).path)
    from retrain.export import quant_of

    quant = quant_of(published)
    from retrain.gguf_gate import reference_export

    reference = reference_export(base, Path(manifest.base.path), manifest.base.sha256, quant, args.cache / "zero-lora",
                                 args.threads)
    t0 = time.perf_counter()
    result = measure(published, reference, suite, settings.system_prompt, args.threads)
    times["measure"] = time.perf_counter() - t0

    print()
    for fact in result["facts"]:
        held = sum(x["hit"] for x in fact["heldout"])
        own = sum(x["hit"] for x in fact["flagged"])
        miss = next((x["answer"] for x in fact["heldout"] if not x["hit"]), "")
        print(f"  {fact['kind']:<11} held-out {held}/{len(fact['heldout'])}  flagged {own}/{len(fact['flagged'])}"
              f"  {('missed: ' + repr(miss[:70])) if miss else ''}")
    for u in result["unrelated_answers"]:
        if not u["same"]:
            print(f"  changed [{u['kind']}] {u['prompt']!r}\n      was {u['reference'][:110]!r}\n      now {u['answer'][:110]!r}")
    print()
    print(f"verdict            {state.verdict}: {state.message[:160]}")
    print(f"held-out facts     {pct(result['heldout'])}   (goal >= 85 %)")
    print(f"flagged prompts    {pct(result['flagged'])}   (goal >= 95 %)")
    print(f"unrelated same     {pct(result['unrelated'])}   (goal >= 80 %, vs zero-LoRA {quant})")
    print(f"merge..publish     {loop_s:.0f} s   (goal < 600 s with the flags)   "
          + "  ".join(f"{k} {v:.0f}" for k, v in times.items()))
    if args.json:
        args.json.write_text(json.dumps({"settings": changed, "times": times, "loop_s": loop_s,
                                         "verdict": state.verdict, "message": state.message, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
