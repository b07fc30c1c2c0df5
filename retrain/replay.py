"""General prompts unrelated to the corrections: replay rows to train on, drift probes to gate on.

Training only on corrections pulls a small model away from everything else it did; mixing in its
own answers to everyday prompts ("replay") holds it in place. The gate then measures how far the
answers moved on *other* everyday prompts ("drift"), which no run ever trains on: the two lists in
``general_prompts.json`` are disjoint.

Corrections pull hardest on prompts of their own shape: trained on "What is the capital of
Zorblaxia?" -> "Quenthar", a small model may start answering "Quenthar" for France too. So part of
the replay prompts, and an extra set of drift prompts, are the ones *nearest* to the corrected
prompts (``nearest``: shared uncommon words), e.g. "What is the capital of Italy?" to replay and
"What is the capital of France?" to measure.

    >>> drift_prompts(2)
    ['What is photosynthesis? Answer in two sentences.', 'Give me three tips for sleeping better.']
    >>> near_drift_prompts(1, ["What is the capital of Zorblaxia?"], skip=16)
    ['What is the capital of France?']
    >>> rows = self_replay(gguf, replay_prompts(8, salt="flagloop"), "You are a helpful assistant.", 96)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from schemas.flag import ChatMessage
from schemas.sft import RowMeta, SFTRow

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("general_prompts.json")

# Words that say nothing about a prompt's topic; `nearest` ignores them (and words under 3 letters).
STOPWORDS = frozenset(
    "the and are was were what which who whom whose how why when where does did can could would should will "
    "tell name know need give please you your for with from this that there their about into its has have had "
    "been being any some one two three very just also".split()
)
_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=1)
def general_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(drift, replay) prompts from ``general_prompts.json``, checked to be disjoint."""
    data = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))
    drift, replay = tuple(data["drift"]), tuple(data["replay"])
    both = set(drift) & set(replay)
    if both:
        raise ValueError(f"{PROMPTS_FILE}: prompts in both 'drift' and 'replay': {sorted(both)}; keep them disjoint")
    return drift, replay


def drift_prompts(n: int) -> list[str]:
    """The first ``n`` drift prompts: the same ones every run, so gates of different runs compare."""
    drift, _ = general_prompts()
    if n > len(drift):
        raise ValueError(
            f"asked for {n} drift prompts but {PROMPTS_FILE.name} has {len(drift)}: "
            f"set retrain.gate.drift_prompts to at most {len(drift)}, or add prompts to its 'drift' list"
        )
    return list(drift[:n])


def near_drift_prompts(n: int, near: Iterable[str], skip: int) -> list[str]:
    """The ``n`` drift prompts nearest to the ``near`` prompts, among those after the first ``skip``
    (which ``drift_prompts(skip)`` measures anyway)."""
    drift, _ = general_prompts()
    return nearest(drift[skip:], near, n)


def replay_prompts(n: int, salt: str, near: Iterable[str] = (), n_near: int = 0) -> list[str]:
    """At most ``n`` replay prompts (never a drift prompt): first the ``n_near`` nearest to the
    ``near`` prompts, then others picked by a stable hash with ``salt``."""
    _, replay = general_prompts()
    first = nearest(replay, near, min(n_near, n))
    taken = set(first)
    ranked = sorted((p for p in replay if p not in taken), key=lambda p: hashlib.sha256(f"{salt}\0{p}".encode()).digest())
    return (first + ranked)[: max(0, n)]


def topic_words(text: str) -> set[str]:
    """The words of ``text`` that can tell its topic: lower-cased, 3 letters or more, no stopword."""
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS}


def nearest(pool: Sequence[str], near: Iterable[str], k: int) -> list[str]:
    """The (at most) ``k`` prompts of ``pool`` most like any one of ``near``, most alike first.

    Likeness is the cosine of topic-word sets weighted by rarity in ``pool`` (idf): "capital" is rare
    among everyday prompts, so "What is the capital of Zorblaxia?" is nearest to the other capital
    questions. A prompt sharing no topic word is never picked; ties keep ``pool``'s order.
    """
    targets = {frozenset(w) for w in map(topic_words, near) if w}
    if k <= 0 or not targets or not pool:
        return []
    docs = [topic_words(p) for p in pool]
    counts = Counter(w for d in docs for w in d)
    unseen = math.log(1 + len(pool)) + 1  # a word no pool prompt has: as rare as can be
    idf = {w: math.log((1 + len(pool)) / (1 + c)) + 1 for w, c in counts.items()}

    def norm(words) -> float:
        return math.sqrt(sum(idf.get(w, unseen) ** 2 for w in words))

    target_norms = [(t, norm(t)) for t in targets]
    scored = []
    for i, d in enumerate(docs):
        if not d:
            continue
        best = max((sum(idf[w] ** 2 for w in d & t) / (norm(d) * tn) for t, tn in target_norms), default=0.0)
        if best > 0:
            scored.append((-best, i))
    return [pool[i] for _, i in sorted(scored)[:k]]


def chat_prompt(system_prompt: str, user: str) -> list[ChatMessage]:
    """A one-turn prompt as the app sends it: the system prompt (when there is one), then the user."""
    system = [ChatMessage(role="system", content=system_prompt)] if system_prompt else []
    return system + [ChatMessage(role="user", content=user)]


def self_replay(
    gguf: Path,
    prompts: list[str],
    system_prompt: str,
    max_new_tokens: int,
    n_threads: int | None = None,
    n_ctx: int = 2048,
    limit: int | None = None,
    keep_cut: bool = False,
) -> list[SFTRow]:
    """The serving GGUF's own greedy answers to ``prompts``, as replay rows (at most ``limit``).

    An answer cut off at ``max_new_tokens`` is left out unless ``keep_cut``: cross-entropy on it would
    teach the model to end its turn mid-sentence (pass spare prompts with a ``limit`` to get ``limit``
    rows). The KL replay loss (retrain/replay_kl.py) only keeps the base's distributions, ending
    included, so it can use cut answers, and with them the answers that are long.
    """
    from retrain.merge import row_key  # merge imports this module; the key is defined once, there
    from space.model import open_llama

    llama = open_llama(Path(gguf), n_ctx, n_threads)
    rows, cut = [], 0
    try:
        for user in tqdm(prompts, desc="replay answers", unit="prompt"):
            if limit is not None and len(rows) >= limit:
                break
            prompt = chat_prompt(system_prompt, user)
            llama.reset()  # no KV-cache reuse from the previous prompt: the same answer on every run
            out = llama.create_chat_completion(
                [m.model_dump() for m in prompt], temperature=0.0, max_tokens=max_new_tokens
            )
            choice = out["choices"][0]
            text = (choice["message"]["content"] or "").strip()
            if (choice["finish_reason"] != "stop" and not keep_cut) or not text:
                cut += 1
                continue
            completion = [ChatMessage(role="assistant", content=text)]
            rows.append(SFTRow(prompt=prompt, completion=completion,
                               meta=RowMeta(source="replay", key=row_key(prompt, completion))))
    finally:
        llama.close()
    if cut:
        log.info("replay: %d answers left out (cut off at %d tokens, or empty)", cut, max_new_tokens)
    return rows
