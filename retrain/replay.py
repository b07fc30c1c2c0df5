"""General prompts unrelated to the corrections: replay rows to train on, drift probes to gate on.

Training only on corrections pulls a small model away from everything else it did; mixing in its
own answers to everyday prompts ("replay") holds it in place. The gate then measures how far the
answers moved on *other* everyday prompts ("drift"), which no run ever trains on: the two lists in
``general_prompts.json`` are disjoint.

    >>> drift_prompts(2)
    ['What is photosynthesis? Answer in two sentences.', 'Give me three tips for sleeping better.']
    >>> rows = self_replay(gguf, replay_prompts(8, salt="flagloop"), "You are a helpful assistant.", 96)
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from schemas.flag import ChatMessage
from schemas.sft import RowMeta, SFTRow

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("general_prompts.json")


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


def replay_prompts(n: int, salt: str) -> list[str]:
    """At most ``n`` replay prompts, picked by a stable hash with ``salt`` (never a drift prompt)."""
    _, replay = general_prompts()
    ranked = sorted(replay, key=lambda p: hashlib.sha256(f"{salt}\0{p}".encode()).digest())
    return ranked[: max(0, n)]


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
) -> list[SFTRow]:
    """The serving GGUF's own greedy answers to ``prompts``, as replay rows (at most ``limit``).

    An answer cut off at ``max_new_tokens`` is left out: training on it would teach the model to
    end its turn mid-sentence. So pass spare prompts with a ``limit`` to get ``limit`` rows.
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
            if choice["finish_reason"] != "stop" or not text:
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
