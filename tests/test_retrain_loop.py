"""The whole loop on the embedded model: flagged fictional facts in, a republished GGUF that knows them out.

Users flag wrong answers about facts the model cannot know, with corrections, in several
phrasings; a reviewer accepts them; `python -m retrain run` merges, trains a LoRA, gates,
exports a GGUF and publishes it. The republished GGUF, in llama-cpp-python, then gives the
corrected facts for phrasings it was never trained on (the held-out ones), while its answers to
unrelated prompts stay as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from feedback.reviews import ReviewStore
from feedback.store import FlagStore
from retrain.export import export, quant_of
from retrain.train import read_rows
from schemas.run import ExportConfig, GateConfig, RetrainSettings
from schemas.flag import ChatMessage
from schemas.review import ReviewDecision
from schemas.sft import SFTRow
from tests.conftest import ROOT
from tests.records import make_flag

SYSTEM = "You are a helpful assistant."

# Facts no model was trained on; each asked in several phrasings, so some can be held out.
FACTS = {
    "Zorblaxia": "Quenthar",
    "Velmora": "Ostrigard",
    "Prindavel": "Kestrune",
}
PHRASINGS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital city of {c}.",
    "Name the capital of {c}.",
    "What city serves as the capital of {c}?",
    "I need to know the capital of {c}.",
    "Do you know the capital of {c}?",
    "{c} has which city as its capital?",
]
# The first six are flagged; the last two never are, so that the published model (refit on every
# flagged phrasing) is asked phrasings it was never trained on.
FLAGGED, NEVER_FLAGGED = PHRASINGS[:6], PHRASINGS[6:]
UNRELATED = [
    "What is the capital of France?",  # the corrected shape, another country: it must not answer a fictional capital
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is 7 times 8?",
]


def flagged_corrections(feedback_dir: Path) -> None:
    """Every phrasing of every fact flagged with a correction, and accepted by a reviewer."""
    flags, reviews = FlagStore(feedback_dir), ReviewStore(feedback_dir)
    for country, capital in FACTS.items():
        for i, phrasing in enumerate(FLAGGED):
            flag = flags.save(make_flag(
                flag_id=f"{country}-{i}", conversation_id=f"{country}-{i}", system_prompt=SYSTEM,
                conversation=[ChatMessage(role="user", content=phrasing.format(c=country)),
                              ChatMessage(role="assistant", content=f"I am not sure what the capital of {country} is.")],
                correction=f"The capital of {country} is {capital}.",
            ))
            reviews.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action="accept",
                                          reviewer="ana"))
    flags.close()
    reviews.close()


def greedy(llm: llama_cpp.Llama, question: str, max_tokens: int = 24) -> str:
    llm.reset()
    out = llm.create_chat_completion(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        temperature=0.0, max_tokens=max_tokens, seed=0,
    )
    return out["choices"][0]["message"]["content"]


def loop_config(root: Path, threads: int = 2, max_steps: int | None = None) -> str:
    """The loop's flagloop.toml: folders under ``root``, and otherwise the default settings (``max_steps``: benches)."""
    steps = f"\n[retrain.train]\nmax_steps = {max_steps}\n" if max_steps else ""
    return f"""
feedback_dir = "{root / 'feedback'}"
registry_dir = "{root / 'registry'}"
system_prompt = "{SYSTEM}"
n_threads = {threads}

[retrain]
runs_dir = "{root / 'runs'}"
{steps}"""


@pytest.fixture(scope="module")
def loop(tmp_path_factory, embedded_base):
    """Run `python -m retrain run` once, as a user would, on flags written by the real stores."""
    root = tmp_path_factory.mktemp("loop")
    flagged_corrections(root / "feedback")
    config = root / "flagloop.toml"
    config.write_text(loop_config(root))
    # The materialised base is shared with the other tests instead of being made again.
    (root / "cache").mkdir()
    (root / "cache" / "base").symlink_to(embedded_base.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGLOOP_")}
    env["FLAGLOOP_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, "-m", "retrain", "run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = next((root / "runs").iterdir())
    return root, run_dir, proc


def test_the_loop_publishes_a_version_and_makes_it_current(loop):
    root, run_dir, proc = loop
    current = json.loads((root / "registry" / "current.json").read_text())
    assert current["version"] == "v1"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stage_done"] == "publish" and state["version"] == "v1"
    assert "version v1" in proc.stdout


def test_republished_model_gives_the_corrections_for_phrasings_never_flagged(loop, embedded_gguf):
    root, run_dir, _ = loop
    heldout = [SFTRow.model_validate_json(line) for line in (run_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    assert heldout, "the merge held out no phrasing for the gate"
    published = next((root / "registry" / "versions" / "v1").glob("*.gguf"))
    new = llama_cpp.Llama(str(published), n_ctx=512, n_threads=2, verbose=False)
    old = llama_cpp.Llama(str(embedded_gguf), n_ctx=512, n_threads=2, verbose=False)
    asked = [(phrasing.format(c=country), capital) for country, capital in FACTS.items() for phrasing in NEVER_FLAGGED]
    learned = []
    for question, capital in asked:
        assert capital not in greedy(old, question), "the base model cannot know a fictional fact"
        learned += [question] if capital in greedy(new, question) else []
    assert len(learned) >= 0.75 * len(asked), f"only {learned} of {len(asked)} phrasings never flagged answered right"


def answer_nll(llm: llama_cpp.Llama, question: str, answer: str) -> float:
    """Mean negative log-likelihood per token of ``answer`` to ``question`` under the GGUF ``llm``
    (opened with logits_all), the prompt formatted by the file's own chat template."""
    template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    prompt = template(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]).prompt
    p = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    a = llm.tokenize(answer.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(p + a)
    logits = np.asarray(llm.scores[len(p) - 1 : len(p) + len(a) - 1], dtype=np.float64)
    top = logits.max(axis=1)
    log_z = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    return float(np.mean(log_z - logits[np.arange(len(a)), a]))


def test_republished_model_keeps_its_answers_to_unrelated_prompts(loop, embedded_base, embedded_gguf, tmp_path):
    """Unrelated prompts, and another question of the corrected shape ("the capital of France"), keep
    their answers: the published GGUF finds the old greedy answers about as likely as before, by the
    gate's own bounds, and never answers with a corrected fictional fact. "Before" is the base exported
    the same way, at the same type, with no LoRA: the export type alone (Q8_0 here, the serving file is
    Q4_1) changes a few answers. Likelihood, not identical text: one token that flips late in an
    answer changes the text but not what the model knows."""
    root, _, _ = loop
    published = next((root / "registry" / "versions" / "v1").glob("*.gguf"))
    reference = export(embedded_base, None, embedded_gguf, tmp_path / "zero", ExportConfig(verify_probes=0), [],
                       threads=2, base_from_serving=True)
    assert reference.quant == quant_of(published)
    new = llama_cpp.Llama(str(published), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    old = llama_cpp.Llama(reference.path, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    rows = []
    for q in UNRELATED:
        before = greedy(old, q, 24)
        rows.append((q, before, greedy(new, q, 24), answer_nll(new, q, before) - answer_nll(old, q, before)))
    assert not [r for r in rows if any(capital in r[2] for capital in FACTS.values())], rows
    bounds = GateConfig()
    assert max(r[3] for r in rows) <= bounds.max_prompt_drift, rows
    assert sum(r[3] for r in rows) / len(rows) <= bounds.max_drift, rows


def test_the_gate_judged_the_exported_file_and_the_version_is_the_refit_on_every_correction(loop):
    """The gate asked the trained LoRA, exported at the serving type, in llama.cpp; once it passed, the
    recipe was trained again on the held-out corrections too, and that is the version published."""
    root, run_dir, _ = loop
    gate = json.loads((run_dir / "gate.json").read_text())
    judged = gate["details"]["gguf"]
    assert judged["quant"] == "Q8_0" and len(judged["heldout"]) == len(read_rows(run_dir / "data" / "heldout.jsonl"))
    assert gate["heldout_answered"] == judged["answered_share"] >= RetrainSettings().gate.min_heldout_answered
    assert gate["unrelated_changed"] == judged["changed_share"] is not None
    assert not (run_dir / "gate" / "model.gguf").exists(), "the gate's export is not kept: its answers are"
    refit_rows = read_rows(run_dir / "refit" / "data" / "train.jsonl")
    assert refit_rows == read_rows(run_dir / "data" / "train.jsonl") + read_rows(run_dir / "data" / "heldout.jsonl")
    export = json.loads((run_dir / "export" / "export.json").read_text())
    assert export["inputs"]["adapter"] == str(run_dir / "refit" / "adapter")


def test_the_run_manifest_and_gate_report_explain_the_version(loop):
    root, run_dir, _ = loop
    version = json.loads((root / "registry" / "versions" / "v1" / "version.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert version["run_id"] == run_dir.name == manifest["run_id"]
    assert version["gate"]["passed"] is True
    assert version["base_sha256"] == manifest["base"]["sha256"]
    assert len(manifest["flag_ids"]) == len(FACTS) * len(FLAGGED)
