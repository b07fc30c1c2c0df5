"""The retraining run: merge -> train -> gate -> refit -> export -> publish, resumable stage by stage.

Each stage writes its results into the run folder and the run's ``state.json`` records the last
completed stage; running the same run again continues after it with the same pinned inputs.
The gate judges a LoRA trained without the held-out corrections; once it passes, the same recipe is
trained again on every accepted correction (``refit``), and that is what is exported and published.
Every version is the *configured base* GGUF plus a LoRA trained on all accepted corrections so far,
so quantization error never compounds from version to version.

    >>> state = run_pipeline(Settings(), run_id="run-20261123-120000")
    >>> state.stage_done, state.verdict, state.version
    ('publish', 'publish', 'v1')
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from retrain.run_files import read_manifest, read_state, write_state  # callers import them from here too
from schemas.run import STAGES, RunManifest, RunState
from schemas.settings import Settings

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def run_dir_of(settings: Settings, run_id: str) -> Path:
    return Path(settings.retrain.runs_dir) / run_id


def done(state: RunState, stage: str) -> bool:
    return state.stage_done != "none" and STAGES.index(state.stage_done) >= STAGES.index(stage)


def base_weights(settings: Settings, manifest: RunManifest) -> str:
    """HF weights to train on: the configured base_model, else the pinned GGUF materialised."""
    from retrain.base import base_folder

    cache = Path(settings.retrain.runs_dir).parent / "cache" / "base"
    return base_folder(manifest.settings.train.base_model, Path(manifest.base.path), cache, manifest.base.sha256)


def run_pipeline(settings: Settings, run_id: str | None = None, stop_after: str | None = None) -> RunState:
    """Run (or continue) one run through every stage; stop early when the gate refuses."""
    from retrain import export as export_stage
    from retrain import gate as gate_stage
    from retrain import merge as merge_stage
    from retrain import publish as publish_stage
    from retrain import replay
    from retrain import train as train_stage
    from retrain.follow import pulled_revision

    run_id = run_id or new_run_id()
    run_dir = run_dir_of(settings, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(run_dir)
    if state.verdict == "refused" or done(state, "publish"):
        log.info("run %s already finished: %s", run_id, state.message)
        return state
    cfg = settings.retrain

    def finished(stage: str, **fields) -> RunState:
        nonlocal state
        state = write_state(run_dir, state.model_copy(update={"stage_done": stage, **fields}))
        log.info("run %s: %s done", run_id, stage)
        return state

    if not done(state, "merge"):
        # The dataset repo's commit the feedback folder was last pulled to: the manifest pins it.
        merge_stage.run_merge(settings, run_dir, base=merge_stage.base_of(settings),
                              dataset_revision=pulled_revision(settings))
        finished("merge")
    if stop_after == "merge":
        return state
    manifest = read_manifest(run_dir)
    # The stages after merge use the settings the manifest pinned: a run continued after the
    # configuration changed is still the run it started as (and resuming a checkpoint needs them).
    cfg = manifest.settings
    base = base_weights(settings, manifest)

    if not done(state, "train"):
        result = train_stage.train(run_dir, base, cfg.train)
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "not logged"
        finished("train", message=f"trained {result.steps} steps, final loss {loss}")
    if stop_after == "train":
        return state
    adapter = run_dir / "adapter"

    if not done(state, "gate"):
        candidate, reference = gate_files(settings, manifest, base, adapter, run_dir)
        report = gate_stage.gate(run_dir, base, adapter, cfg.gate, system_prompt=settings.system_prompt,
                                 threads=settings.n_threads, candidate=candidate, reference=reference)
        candidate.unlink()  # its answers are in gate.json; the file people get is exported after the refit
        finished("gate", verdict="pending" if report.passed else "refused", message=report.reason)
        if not report.passed:
            log.warning("run %s: the gate refused the model: %s", run_id, report.reason)
            return state
    if stop_after == "gate":
        return state

    refit = cfg.train.refit and manifest.counts.get("heldout", 0) > 0
    if not done(state, "refit"):
        if refit:
            result = train_stage.train(train_stage.refit_folder(run_dir), base, cfg.train)
            finished("refit", message=f"refit on all {manifest.counts['train'] + manifest.counts['heldout']} "
                                      f"corrections (held-out ones too): {result.steps} steps")
        else:
            finished("refit", message="no refit: " + ("train.refit is off" if not cfg.train.refit
                                                      else "no held-out corrections"))
    if stop_after == "refit":
        return state
    if not done(state, "export"):
        adapter = (train_stage.refit_folder(run_dir) if refit else run_dir) / train_stage.ADAPTER
        probes = replay.drift_prompts(cfg.export.verify_probes)
        result = export_stage.export(base, adapter, Path(manifest.base.path), run_dir / "export", cfg.export, probes,
                                     threads=settings.n_threads, base_from_serving=cfg.train.base_model is None)
        finished("export", message=f"exported {result.quant} GGUF")
    if stop_after == "export":
        return state

    if not done(state, "publish"):
        report = gate_stage.read_report(run_dir)
        refit_log = run_dir / train_stage.REFIT / train_stage.TRAIN_LOG
        metrics = train_metrics(refit_log.parent if refit_log.exists() else run_dir)  # the published LoRA's training
        version = publish_stage.publish_version(settings, run_dir, run_dir / "export" / "model.gguf", manifest,
                                                report, metrics)
        finished("publish", verdict="publish", version=version.version,
                 message=f"published {version.version}: {report.reason if report else ''}")
    return state


def gate_files(settings: Settings, manifest: RunManifest, base: str, adapter: Path, run_dir: Path) -> tuple[Path, Path]:
    """The trained LoRA exported as it would be served (run_dir/gate/), and the zero-LoRA export at that type."""
    from retrain import export as export_stage
    from retrain.gguf_gate import reference_export

    cfg = manifest.settings
    candidate = export_stage.export(base, adapter, Path(manifest.base.path), run_dir / "gate", cfg.export, [],
                                    threads=settings.n_threads, base_from_serving=cfg.train.base_model is None)
    cache = Path(settings.retrain.runs_dir).parent / "cache" / "zero-lora"
    reference = reference_export(base, Path(manifest.base.path), manifest.base.sha256, candidate.quant, cache,
                                 settings.n_threads)
    return Path(candidate.path), reference


def train_metrics(run_dir: Path) -> dict:
    """Summary of the training log for the model card: steps, first and last loss."""
    import json

    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [e["loss"] for e in entries if e.get("loss") is not None]
    return {
        "steps": max((e.get("step", 0) for e in entries), default=0),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }
