"""Run folders written straight to disk for the status views' tests: the records the stages write
(RunState through retrain.pipeline.write_state, a GateReport shaped as retrain.gate writes it, the
train log's lines as retrain.train's callback appends them), without training anything."""

from __future__ import annotations

import json
from pathlib import Path

from retrain.pipeline import write_state
from retrain.registry import LocalRegistry
from schemas.registry import GateReport
from schemas.run import RunState

OLD, NEW = "run-20261121-030000", "run-20261122-030000"
PASSED = "held-out corrections improved (NLL/token 2.100 -> 0.900) and drift 0.050 is within 0.5"

MEASURE = ("held-out: mean log-likelihood per correction token (higher is better); "
           "drift: rise of NLL per token of the base's own answers to unrelated prompts")


def gate_report(passed: bool, reason: str, heldout: list[tuple[str, str, str, str, float, float]],
                drift: list[tuple]) -> GateReport:
    """A GateReport with gate.json's details: heldout (prompt, correction, answer before, answer after,
    NLL before, NLL after) and drift (prompt, base answer, NLL before, NLL after[, near]) rows; near:
    the prompt is one of those nearest to the corrections."""
    before = sum(h[4] for h in heldout) / len(heldout)
    after = sum(h[5] for h in heldout) / len(heldout)
    rise = sum(d[3] - d[2] for d in drift) / len(drift) if drift else 0.0
    return GateReport(
        passed=passed, reason=reason, heldout_before=-before, heldout_after=-after, drift=rise,
        details={
            "measure": MEASURE,
            "heldout": [{"prompt": p, "correction": c, "nll_before": b, "nll_after": a, "answer_before": ab,
                         "answer_after": aa} for p, c, ab, aa, b, a in heldout],
            "drift": [{"prompt": d[0], "answer": d[1], "nll_before": d[2], "nll_after": d[3],
                       "near": bool(d[4:] and d[4])} for d in drift],
            "config": {"min_heldout_gain": 0.0, "max_drift": 0.5},
        },
    )


def write_run(runs_dir: Path, run_id: str, stage_done: str = "none", verdict: str = "pending",
              losses: list[float] | None = None, gate: GateReport | None = None, version: str | None = None,
              message: str = "") -> Path:
    """A run folder as the pipeline leaves it after ``stage_done``: state.json, train_log.jsonl, gate.json."""
    run_dir = Path(runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if losses is not None:
        lines = [json.dumps({"step": step, "loss": loss, "lr": 2e-4, "tokens": 128 * step, "time": 1.8e9 + step})
                 for step, loss in enumerate(losses, start=1)]
        (run_dir / "train_log.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if gate is not None:
        (run_dir / "gate.json").write_text(gate.model_dump_json(indent=2), encoding="utf-8")
    write_state(run_dir, RunState(run_id=run_id, stage_done=stage_done, verdict=verdict, version=version,
                                  message=message))
    return run_dir


def published_run(runs_dir: Path, registry_dir: Path, scratch: Path) -> GateReport:
    """Run OLD, whose gate passed, published as the registry's v1 (its GGUF a stand-in in ``scratch``)."""
    passed = gate_report(True, PASSED, [("What is the capital of Zorblaxia?", "Quenthar.", "Paris.", "Quenthar.",
                                         2.1, 0.9)], [("Name a colour.", "Blue.", 1.0, 1.05)])
    write_run(runs_dir, OLD, "publish", "publish", [2.4, 1.6, 0.8], passed, version="v1")
    gguf = Path(scratch) / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in: the registry copies and hashes it, the tab only reads its record")
    LocalRegistry(registry_dir).publish(gguf, quant="Q4_1", base_sha256="0" * 64, run_id=OLD, gate=passed)
    return passed
