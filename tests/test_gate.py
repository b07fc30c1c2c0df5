"""The gate's verdict: publish only when held-out corrections improve and drift stays bounded."""

from __future__ import annotations

import pytest

from retrain.gate import Scored, completion_nll, decide, encode, greedy_answers
from retrain.gguf_gate import HeldoutAnswer, Judgement, UnrelatedAnswer, distinctive_words, holds
from schemas.run import GateConfig


def test_gate_passes_when_heldout_improves_and_drift_is_small():
    passed, reason = decide(Scored([2.0, 3.0], [0.5, 1.0]), drift=0.1, cfg=GateConfig(max_drift=0.5))
    assert passed
    assert "improved" in reason and "2.500 -> 0.750" in reason


def test_gate_refuses_when_heldout_gets_worse():
    passed, reason = decide(Scored([1.0], [1.5]), drift=0.0, cfg=GateConfig())
    assert not passed
    assert "did not improve" in reason and "1.000 -> 1.500" in reason


def test_gate_refuses_a_gain_below_the_configured_minimum():
    passed, reason = decide(Scored([1.0], [0.9]), drift=0.0, cfg=GateConfig(min_heldout_gain=0.5))
    assert not passed
    assert "needed > 0.5" in reason


def test_gate_refuses_when_unrelated_answers_drift_too_far():
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.9, cfg=GateConfig(max_drift=0.5))
    assert not passed
    assert "drifted" in reason and "0.900" in reason


def test_gate_refuses_one_flipped_answer_that_a_small_mean_drift_hides():
    worst = ("What is the capital of France?", 2.4)
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.15, cfg=GateConfig(max_drift=0.5, max_prompt_drift=1.5),
                            worst=worst)
    assert not passed
    assert "'What is the capital of France?'" in reason and "2.400" in reason and "1.5" in reason
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.15, cfg=GateConfig(), worst=(worst[0], 0.2))
    assert passed and "at most 0.200 on one prompt" in reason


def test_gate_refuses_without_heldout_rows_and_says_what_to_do():
    passed, reason = decide(Scored([], []), drift=0.0, cfg=GateConfig())
    assert not passed
    assert "heldout_fraction" in reason


def test_an_answer_holds_a_correction_when_it_has_its_distinctive_words():
    correction, question = "The Brightwater Rowing Club was founded by Maren Tollsby.", "Who founded the Brightwater Rowing Club?"
    assert distinctive_words(correction, question) == ["maren", "tollsby"]
    assert holds("It was founded by Maren Tollsby in 1901.", ["maren", "tollsby"])
    assert holds("Tollsby founded it.", ["maren", "tollsby"])  # half is enough
    assert not holds("The Brightwater Rowing Club was founded by the Ocean Breeze Collective.", ["maren", "tollsby"])
    # File names, numbers and versions stay whole; a correction that only repeats the question says nothing new.
    assert distinctive_words("Its settings are in quillrc.toml.", "Where are Quillpad's settings?") == ["quillrc.toml"]
    assert distinctive_words("Zephyra-9 has 17 moons.", "How many moons does Zephyra-9 have?") == ["17"]
    assert distinctive_words("The capital is Paris.", "What is the capital? Paris?") == []
    assert not holds("anything", [])


def judgement(answered: list[bool], changed: list[bool]) -> Judgement:
    heldout = [HeldoutAnswer(f"q{i}", "c", ["w"], "a", ok) for i, ok in enumerate(answered)]
    unrelated = [UnrelatedAnswer(f"p{i}", "old answer", "new answer" if moved else "old answer")
                 for i, moved in enumerate(changed)]
    return Judgement(heldout, unrelated, "Q8_0")


def test_gate_refuses_a_gguf_that_changes_most_unrelated_answers_and_shows_them():
    cfg = GateConfig(max_unrelated_changed=0.5, min_heldout_answered=0.5)
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.0, cfg=cfg, judged=judgement([True], [True, True, False]))
    assert not passed
    assert "changed 2 of 3 unrelated answers (67%, bound 50%)" in reason and "'p0': 'old answer' -> 'new answer'" in reason
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.0, cfg=cfg, judged=judgement([True], [True, False]))
    assert passed and "answers 100% of held-out corrections, 50% of unrelated answers changed" in reason


def test_gate_refuses_a_gguf_that_does_not_answer_the_held_out_corrections():
    cfg = GateConfig(min_heldout_answered=0.5)
    passed, reason = decide(Scored([2.0], [0.1]), drift=0.0, cfg=cfg, judged=judgement([False, False, True], []))
    assert not passed and "answers only 33% of the held-out corrections (bound 50%)" in reason
    assert "'q0' -> 'a' (wanted w)" in reason


@pytest.fixture(scope="module")
def base_model(embedded_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32), AutoTokenizer.from_pretrained(embedded_base)


def test_likelihood_prefers_the_true_answer(base_model):
    model, tokenizer = base_model
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    right, wrong = completion_nll(model, tokenizer, [
        (prompt, [{"role": "assistant", "content": "The capital of France is Paris."}]),
        (prompt, [{"role": "assistant", "content": "The capital of France is Berlin."}]),
    ])
    assert right < wrong


def test_completion_tokens_start_after_the_prompt(base_model):
    _, tokenizer = base_model
    ids, cut = encode(tokenizer, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "Hello there."}])
    assert tokenizer.decode(ids[cut:]).startswith("Hello there.")


def test_batched_greedy_answers_equal_one_by_one(base_model):
    model, tokenizer = base_model
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Name a primary colour in one word."}]]
    together = greedy_answers(model, tokenizer, prompts, 12)
    alone = [greedy_answers(model, tokenizer, [p], 12)[0] for p in prompts]
    assert together == alone
    assert "Paris" in together[0]
