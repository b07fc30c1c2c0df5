"""gguf_gate: judge the exported file, in llama.cpp, the way people will meet it, next to a zero-LoRA export.

The NLL measures of retrain/gate.py are taken in PyTorch on the float model; people are served the
quantized GGUF and see greedy text. So the gate also exports the trained LoRA at the serving type
and asks it, in llama-cpp-python, greedily (as export's checks do: temperature 0, no repeat penalty):

- each held-out correction's prompt: is it **answered**? The answer must hold at least half of the
  correction's *distinctive* words (those not in the question and not everyday words, e.g.
  "Tollsby" in "The club was founded by Maren Tollsby." for "Who founded the club?");
- each unrelated (drift) prompt: is the answer **changed** from the zero-LoRA export's at the same
  type (the base as it would be served without any training)? Any difference in the text counts.

    >>> judged = judge(candidate, reference, heldout_rows, drift, system_prompt, max_new_tokens=48)
    >>> judged.answered_share, judged.changed_share
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from retrain.replay import STOPWORDS
from schemas.sft import SFTRow

_WORD = re.compile(r"[a-z0-9]+(?:[._'-][a-z0-9]+)*")
MIN_WORD_SHARE = 0.5  # of a correction's distinctive words an answer must hold to count as answered


def words(text: str) -> list[str]:
    """Lower-cased words, keeping file names, versions and hyphenated names whole ("quillrc.toml")."""
    return _WORD.findall(text.lower())


def distinctive_words(correction: str, question: str) -> list[str]:
    """The words of ``correction`` that say what the question does not: not in it, not everyday words."""
    asked = set(words(question))
    out = []
    for w in words(correction):
        if w in asked or w in STOPWORDS or (len(w) < 3 and not w.isdigit()) or w in out:
            continue
        out.append(w)
    return out


def holds(answer: str, wanted: list[str]) -> bool:
    """Whether ``answer`` has at least MIN_WORD_SHARE of the ``wanted`` words."""
    if not wanted:
        return False
    have = set(words(answer))
    return sum(w in have for w in wanted) >= MIN_WORD_SHARE * len(wanted)


@dataclass
class HeldoutAnswer:
    prompt: str
    correction: str
    wanted: list[str]
    answer: str
    answered: bool


@dataclass
class UnrelatedAnswer:
    prompt: str
    reference: str
    answer: str

    @property
    def changed(self) -> bool:
        return self.answer != self.reference


@dataclass
class Judgement:
    """The exported file's greedy answers: held-out corrections answered, unrelated answers changed."""

    heldout: list[HeldoutAnswer]
    unrelated: list[UnrelatedAnswer]
    quant: str

    @property
    def answered_share(self) -> float | None:
        judged = [h for h in self.heldout if h.wanted]
        return sum(h.answered for h in judged) / len(judged) if judged else None

    @property
    def changed_share(self) -> float | None:
        return sum(u.changed for u in self.unrelated) / len(self.unrelated) if self.unrelated else None

    def to_json(self) -> dict:
        return {
            "quant": self.quant, "answered_share": self.answered_share, "changed_share": self.changed_share,
            "heldout": [asdict(h) for h in self.heldout],
            "unrelated": [{**asdict(u), "changed": u.changed} for u in self.unrelated],
        }


def judge(candidate: Path, reference: Path, heldout: list[SFTRow], unrelated: list[str], system_prompt: str,
          max_new_tokens: int, threads: int | None = None, quant: str = "") -> Judgement:
    """Greedy answers of ``candidate`` (and of ``reference`` for the unrelated prompts), judged."""
    from retrain.export import gguf_answers

    questions = [row.prompt[-1].content for row in heldout]
    answers = gguf_answers(candidate, questions + list(unrelated), max_new_tokens, threads, system_prompt)
    before = gguf_answers(reference, list(unrelated), max_new_tokens, threads, system_prompt) if unrelated else []
    held = []
    for row, question, answer in zip(heldout, questions, answers):
        correction = row.completion[-1].content
        wanted = distinctive_words(correction, question)
        held.append(HeldoutAnswer(question, correction, wanted, answer, holds(answer, wanted)))
    others = [UnrelatedAnswer(p, b, a) for p, b, a in zip(unrelated, before, answers[len(questions):])]
    return Judgement(held, others, quant)


def reference_export(base: str | Path, serving: Path, serving_sha256: str, quant: str, cache: Path,
                     threads: int | None = None) -> Path:
    """The zero-LoRA export of ``base`` at ``quant``: the base as it would be served untrained (kept in ``cache``,
    by the serving file's sha256, which the run's manifest already pins)."""
    from retrain.export import export
    from schemas.run import ExportConfig

    out = Path(cache) / f"{serving_sha256[:16]}-{quant}"
    return Path(export(base, None, serving, out, ExportConfig(quant=quant, verify_probes=0), [], threads=threads).path)
