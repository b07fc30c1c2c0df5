"""gate: publish only a model that learned the held-out corrections and kept its other answers.

Two measures, both on the PyTorch model with and without the trained LoRA (one model in memory,
the adapter switched off for "before"):

- **held-out corrections**: the mean log-likelihood per token of each held-out correction given its
  prompt. These rows were never trained on: a rise means the fact generalised to new phrasings.
  The greedy answers before and after are in the report, for people.
- **drift**: the base model's own greedy answers to general prompts unrelated to the corrections
  (and not used for replay); how much less likely the trained model finds them (mean NLL per token,
  after - before). A large rise means the model forgot how it used to answer. Besides the same
  general prompts every run, the drift prompts nearest to the trained prompts (retrain/replay.py
  ``nearest``) are measured too, and each prompt on its own is bounded: a mean over many prompts
  can hide the one answer that flipped ("What is the capital of France?" answered with a
  corrected fictional capital).

And what people will see (retrain/gguf_gate.py): the trained LoRA exported at the serving type, asked
greedily in llama.cpp, must answer at least ``min_heldout_answered`` of the held-out corrections with
their distinctive words, and change at most ``max_unrelated_changed`` of the drift prompts' answers
from a zero-LoRA export at the same type; a refusal shows the answers that changed.

    >>> report = gate(run_dir, base="…/base", adapter=run_dir / "adapter", cfg=GateConfig(),
    ...               candidate=run_dir / "gate" / "model.gguf", reference=zero_lora_gguf)
    >>> report.passed, report.reason
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from retrain.gguf_gate import Judgement, judge
from schemas.flag import ChatMessage
from schemas.registry import GateReport
from schemas.run import GateConfig
from schemas.sft import SFTRow

log = logging.getLogger(__name__)

BATCH = 8


@dataclass
class Scored:
    """Per-row likelihoods of a completion, before and after training."""

    nll_before: list[float]
    nll_after: list[float]

    @property
    def mean_before(self) -> float:
        return sum(self.nll_before) / len(self.nll_before) if self.nll_before else 0.0

    @property
    def mean_after(self) -> float:
        return sum(self.nll_after) / len(self.nll_after) if self.nll_after else 0.0


def read_rows(path: Path) -> list[SFTRow]:
    if not path.exists():
        return []
    return [SFTRow.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def messages(turns: list[ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in turns]


def encode(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and where the completion starts (as TRL's prompt-completion does)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    return full_ids, len(prompt_ids)


def completion_nll(model, tokenizer, pairs: list[tuple[list[dict], list[dict]]]) -> list[float]:
    """Mean negative log-likelihood per completion token of each (prompt, completion)."""
    import torch

    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(pairs), BATCH):
        encoded = [encode(tokenizer, p, c) for p, c in pairs[start : start + BATCH]]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for i, (ids, cut) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, cut : len(ids)] = torch.tensor(ids[cut:])
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(picked * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.extend(nll.tolist())
    return out


def greedy_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers, batched with left padding."""
    import torch

    answers: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), BATCH):
        batch = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in prompts[start : start + BATCH]
        ]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )
        answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out)
    return answers


def decide(heldout: Scored, drift: float, cfg: GateConfig, worst: tuple[str, float] | None = None,
           judged: Judgement | None = None) -> tuple[bool, str]:
    """The verdict and its reason, from the measures alone (pure, so it is easy to test).

    ``drift``: mean rise of NLL/token of the old answers over all drift prompts; ``worst``: the drift
    prompt whose old answer lost most, with that rise; ``judged``: the exported GGUF's greedy answers.
    """
    if not heldout.nll_before:
        return False, (
            "no held-out corrections to judge the model on: accept more corrections, "
            "or raise retrain.merge.heldout_fraction"
        )
    gain = heldout.mean_before - heldout.mean_after  # NLL falls when the corrections become likely
    if gain <= cfg.min_heldout_gain:
        return False, (
            f"held-out corrections did not improve enough: NLL/token {heldout.mean_before:.3f} -> "
            f"{heldout.mean_after:.3f} (gain {gain:.3f}, needed > {cfg.min_heldout_gain})"
        )
    if drift > cfg.max_drift:
        return False, (
            f"answers to unrelated prompts drifted too far: NLL/token of the old answers rose by {drift:.3f} "
            f"(bound {cfg.max_drift}); train fewer steps, lower the learning rate, or add replay rows"
        )
    if worst is not None and worst[1] > cfg.max_prompt_drift:
        return False, (
            f"the old answer to {worst[0]!r} drifted too far: its NLL/token rose by {worst[1]:.3f} (bound "
            f"{cfg.max_prompt_drift} per prompt), so the model now answers it differently; the corrections "
            "spilled over to prompts like it: train fewer steps, lower the learning rate, or add replay rows"
        )
    if judged is not None:
        refused = gguf_refusal(judged, cfg)
        if refused:
            return False, refused
    worst_text = f", at most {worst[1]:.3f} on one prompt" if worst is not None else ""
    gguf_text = ""
    if judged is not None and judged.answered_share is not None and judged.changed_share is not None:
        gguf_text = (f"; the {judged.quant} GGUF answers {judged.answered_share:.0%} of held-out corrections, "
                     f"{judged.changed_share:.0%} of unrelated answers changed")
    return True, (
        f"held-out corrections improved (NLL/token {heldout.mean_before:.3f} -> {heldout.mean_after:.3f}) "
        f"and drift {drift:.3f} is within {cfg.max_drift}{worst_text}{gguf_text}"
    )


def gguf_refusal(judged: Judgement, cfg: GateConfig) -> str | None:
    """Why the exported GGUF's answers refuse the model, or None."""
    answered, changed = judged.answered_share, judged.changed_share
    if answered is not None and answered < cfg.min_heldout_answered:
        missed = [h for h in judged.heldout if h.wanted and not h.answered]
        shown = "; ".join(f"{h.prompt!r} -> {h.answer[:80]!r} (wanted {', '.join(h.wanted)})" for h in missed[:3])
        return (f"the {judged.quant} GGUF answers only {answered:.0%} of the held-out corrections (bound "
                f"{cfg.min_heldout_answered:.0%}), e.g. {shown}: train more steps or a higher learning rate")
    if changed is not None and changed > cfg.max_unrelated_changed:
        moved = [u for u in judged.unrelated if u.changed]
        shown = "; ".join(f"{u.prompt!r}: {u.reference[:60]!r} -> {u.answer[:60]!r}" for u in moved[:3])
        return (f"the {judged.quant} GGUF changed {len(moved)} of {len(judged.unrelated)} unrelated answers "
                f"({changed:.0%}, bound {cfg.max_unrelated_changed:.0%}) from the untrained model's, e.g. {shown}: "
                "train fewer steps, lower the learning rate, or add replay rows")
    return None


def gate(
    run_dir: Path,
    base: str | Path,
    adapter: Path,
    cfg: GateConfig,
    system_prompt: str = "",
    threads: int | None = None,
    candidate: Path | None = None,
    reference: Path | None = None,
) -> GateReport:
    """Measure before vs after, decide, and write run_dir/gate.json.

    ``candidate``: the trained LoRA exported at the serving type, ``reference``: the zero-LoRA export at
    that type; given both, their greedy answers in llama.cpp are judged too (retrain/gguf_gate.py).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.replay import drift_prompts, near_drift_prompts

    run_dir = Path(run_dir)
    torch.set_num_threads(threads or max(1, min(4, os.cpu_count() or 1)))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    rows = read_rows(run_dir / "data" / "heldout.jsonl")
    pairs = [(messages(r.prompt), messages(r.completion)) for r in rows]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    trained = [r.prompt[-1].content for r in read_rows(run_dir / "data" / "train.jsonl")]
    near = near_drift_prompts(cfg.near_drift_prompts, trained, skip=cfg.drift_prompts)
    drift_set = drift_prompts(cfg.drift_prompts) + near
    general = [system + [{"role": "user", "content": p}] for p in drift_set]

    log.info("gate: %d held-out corrections, %d drift prompts (%d of them near the corrections)", len(pairs),
             len(general), len(near))
    with model.disable_adapter():
        before = completion_nll(model, tokenizer, pairs)
        answered_before = greedy_answers(model, tokenizer, [p for p, _ in pairs], cfg.max_new_tokens)
        old_answers = greedy_answers(model, tokenizer, general, cfg.max_new_tokens)
        old_pairs = [(p, [{"role": "assistant", "content": a}]) for p, a in zip(general, old_answers)]
        drift_before = completion_nll(model, tokenizer, old_pairs)
    after = completion_nll(model, tokenizer, pairs)
    answered_after = greedy_answers(model, tokenizer, [p for p, _ in pairs], cfg.max_new_tokens)
    drift_after = completion_nll(model, tokenizer, old_pairs)

    judged = None
    if candidate is not None and reference is not None:
        from retrain.export import quant_of

        log.info("gate: greedy answers of %s next to %s", candidate, reference)
        judged = judge(Path(candidate), Path(reference), rows, drift_set, system_prompt, cfg.max_new_tokens, threads,
                       quant=quant_of(Path(candidate)))
    heldout = Scored(before, after)
    drift_scored = Scored(drift_before, drift_after)
    drift = drift_scored.mean_after - drift_scored.mean_before if old_pairs else 0.0
    rises = [a - b for b, a in zip(drift_before, drift_after)]
    worst = max(zip(drift_set, rises), key=lambda pr: pr[1]) if rises else None
    near_rises = rises[len(drift_set) - len(near):]
    passed, reason = decide(heldout, drift, cfg, worst, judged)
    report = GateReport(
        passed=passed,
        reason=reason,
        heldout_before=-heldout.mean_before,
        heldout_after=-heldout.mean_after,
        drift=drift,
        drift_near=sum(near_rises) / len(near_rises) if near_rises else None,
        drift_worst=worst[1] if worst else None,
        heldout_answered=judged.answered_share if judged else None,
        unrelated_changed=judged.changed_share if judged else None,
        details={
            "measure": "held-out: mean log-likelihood per correction token (higher is better); "
            "drift: rise of NLL per token of the base's own answers to unrelated prompts",
            "heldout": [
                {"prompt": p[-1]["content"], "correction": c[0]["content"], "nll_before": b, "nll_after": a,
                 "answer_before": ab, "answer_after": aa}
                for (p, c), b, a, ab, aa in zip(pairs, before, after, answered_before, answered_after)
            ],
            "drift": [
                {"prompt": p[-1]["content"], "answer": c[0]["content"], "nll_before": b, "nll_after": a,
                 "near": i >= len(drift_set) - len(near)}
                for i, ((p, c), b, a) in enumerate(zip(old_pairs, drift_before, drift_after))
            ],
            "gguf": judged.to_json() if judged else None,
            "config": cfg.model_dump(),
        },
    )
    tmp = run_dir / "gate.json.tmp"
    tmp.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / "gate.json")
    log.info("gate: %s — %s", "PASS" if passed else "REFUSED", reason)
    return report


def read_report(run_dir: Path) -> GateReport | None:
    path = Path(run_dir) / "gate.json"
    return GateReport.model_validate(json.loads(path.read_text())) if path.exists() else None
