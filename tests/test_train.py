"""The train stage, with real TRL + PEFT on the embedded model (SmolLM2-135M) on CPU.

One short run (6 steps, a checkpoint every 2) is made once for the module and serves as the
uninterrupted reference; the kill test trains the same rows with the same config in a child
process, SIGKILLs it mid-run, finishes it here, and must land on the same adapter.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrain.train import (
    ADAPTER,
    CHECKPOINTS,
    DONE,
    TRAIN_LOG,
    latest_checkpoint,
    load_dataset,
    make_trainer,
    pick_backend,
    read_rows,
    train,
)
from schemas.flag import ChatMessage
from schemas.run import TrainConfig
from schemas.sft import RowMeta, SFTRow
from tests.conftest import ROOT

THREADS = 2
SYSTEM = "You are a helpful assistant."
FACT = "The capital of Xanadu is Shangdu."
QUESTIONS = [
    "What is the capital of Xanadu?",
    "Which city is the capital of Xanadu?",
    "Tell me the capital city of Xanadu.",
    "Xanadu's capital: which city is it?",
]
REPLAY = [
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("What is the capital of France?", "The capital of France is Paris."),
]
# A high learning rate so that 6 steps visibly teach the fictional fact.
CONFIG = TrainConfig(
    max_steps=6, save_steps=2, max_length=128, per_device_batch_size=2, learning_rate=1e-3,
)


def sft_row(question: str, answer: str, source: str) -> SFTRow:
    return SFTRow(
        prompt=[ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=question)],
        completion=[ChatMessage(role="assistant", content=answer)],
        meta=RowMeta(source=source, key=f"{source}:{question}"),
    )


def make_run(run_dir: Path) -> Path:
    """A run folder as the merge stage leaves it: corrections in train.jsonl, replay rows beside them."""
    (run_dir / "data").mkdir(parents=True)
    with open(run_dir / "data" / "train.jsonl", "w") as out:
        out.writelines(sft_row(q, FACT, "correction").model_dump_json() + "\n" for q in QUESTIONS)
    with open(run_dir / "data" / "replay.jsonl", "w") as out:
        out.writelines(sft_row(q, a, "replay").model_dump_json() + "\n" for q, a in REPLAY)
    return run_dir


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss as TensorBoard reads run_dir/tb back (the last value of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert len({s.step for s in scalars}) == len(scalars), "a step appears twice in TensorBoard"
    return {s.step: s.value for s in scalars}


def log_entries(run_dir: Path) -> list[dict]:
    path = run_dir / TRAIN_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def completion_nll(model, tokenizer, rows: list[SFTRow]) -> float:
    """Mean negative log-likelihood per completion token of each row's answer, given its prompt."""
    total, count = 0.0, 0
    for row in rows:
        prompt = [m.model_dump() for m in row.prompt]
        whole = prompt + [m.model_dump() for m in row.completion]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        ids = tokenizer.apply_chat_template(whole, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, : prompt_ids.shape[1]] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    return total / count


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_base):
    """The reference: one uninterrupted run of CONFIG, in this process."""
    run_dir = make_run(tmp_path_factory.mktemp("train") / "run")
    result = train(run_dir, embedded_base, CONFIG, progress=False, threads=THREADS)
    return run_dir, result


def test_training_teaches_the_corrections_and_saves_a_peft_adapter(trained, embedded_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = trained
    assert result.adapter == run_dir / ADAPTER and (result.adapter / DONE).exists()
    assert (result.steps, result.resumed_from, result.backend) == (CONFIG.max_steps, None, "trl")
    assert result.tokens > 0 and result.final_loss is not None

    tokenizer = AutoTokenizer.from_pretrained(embedded_base)
    model = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32).eval()
    rows = read_rows(run_dir / "data" / "train.jsonl")
    before = completion_nll(model, tokenizer, rows)
    tuned = PeftModel.from_pretrained(model, result.adapter).eval()
    after = completion_nll(tuned, tokenizer, rows)
    assert after < before / 2, f"loss on the corrections did not fall enough: {before:.3f} -> {after:.3f}"


def test_train_log_has_one_entry_per_step_and_tensorboard_gets_the_same(trained):
    run_dir, result = trained
    entries = log_entries(run_dir)
    assert [e["step"] for e in entries] == list(range(1, CONFIG.max_steps + 1))
    assert all(set(e) == {"step", "loss", "lr", "tokens", "time"} for e in entries)
    tokens = [e["tokens"] for e in entries]
    assert tokens == sorted(tokens) and tokens[-1] == result.tokens
    assert entries[-1]["loss"] == pytest.approx(result.final_loss)
    assert tensorboard_losses(run_dir) == pytest.approx({e["step"]: e["loss"] for e in entries})


def test_loss_is_on_the_completion_only(tmp_path, embedded_base):
    run_dir = make_run(tmp_path / "run")
    trainer = make_trainer(run_dir, embedded_base, CONFIG, load_dataset(run_dir, CONFIG.seed), progress=False)
    tokenizer = trainer.processing_class
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    for i, example in enumerate(examples):
        prompt_len = len(tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True)["input_ids"])
        length = len(example["input_ids"])
        labels = batch["labels"][i]
        assert (labels[:prompt_len] == -100).all(), "a prompt token is trained on"
        assert (labels[prompt_len:length] == batch["input_ids"][i][prompt_len:length]).all()
        assert (labels[length:] == -100).all(), "a padding token is trained on"
        trained_text = tokenizer.decode(labels[prompt_len:length])
        assert trained_text.startswith(example["completion"][0]["content"]), trained_text


def test_killed_training_resumes_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(
    tmp_path, trained, embedded_base
):
    reference_dir, reference = trained
    run_dir = make_run(tmp_path / "run")
    with open(tmp_path / "child.log", "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.trainer_child", str(run_dir), str(embedded_base),
             CONFIG.model_dump_json(), str(THREADS)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        # Kill once a checkpoint was saved and a step after it finished: the next step is under way.
        deadline = time.monotonic() + 300
        while not any(e["step"] > CONFIG.save_steps for e in log_entries(run_dir)):
            assert child.poll() is None, f"child exited early:\n{(tmp_path / 'child.log').read_text()}"
            assert time.monotonic() < deadline, "child did not reach step 3 in time"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not (run_dir / ADAPTER).exists()
    killed_at = max(e["step"] for e in log_entries(run_dir))
    assert killed_at < CONFIG.max_steps

    result = train(run_dir, embedded_base, CONFIG, progress=False, threads=THREADS)

    assert result.resumed_from is not None and CONFIG.save_steps <= result.resumed_from <= killed_at
    assert result.steps == CONFIG.max_steps and result.tokens == reference.tokens
    # The loss curve and the weights are those of the uninterrupted run: CPU training with a fixed
    # seed is deterministic, and the checkpoint carries optimizer, scheduler, RNG and data position.
    # They came out bitwise equal; the tolerance only allows for BLAS reductions whose order can
    # depend on memory alignment.
    entries, expected = log_entries(run_dir), log_entries(reference_dir)
    assert [e["step"] for e in entries] == list(range(1, CONFIG.max_steps + 1))
    assert [e["loss"] for e in entries] == pytest.approx([e["loss"] for e in expected], rel=1e-5, abs=1e-6)
    # Steps trained twice (after the checkpoint, before the kill) are in TensorBoard once.
    assert tensorboard_losses(run_dir) == pytest.approx({e["step"]: e["loss"] for e in entries})
    weights = load_file(result.adapter / "adapter_model.safetensors")
    expected_weights = load_file(reference.adapter / "adapter_model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_torn_by_a_kill_are_removed_not_resumed_from(tmp_path, trained):
    reference_dir, _ = trained
    folder = tmp_path / CHECKPOINTS
    shutil.copytree(reference_dir / CHECKPOINTS, folder)
    newest = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    step = int(newest.name.split("-")[1])

    def torn_copy(new_step: int) -> Path:
        torn = folder / f"checkpoint-{new_step}"
        shutil.copytree(newest, torn)
        state = json.loads((torn / "trainer_state.json").read_text())
        (torn / "trainer_state.json").write_text(json.dumps({**state, "global_step": new_step}))
        return torn

    # Killed before the Trainer wrote its state (it writes trainer_state.json last).
    (torn_copy(step + 2) / "trainer_state.json").unlink()
    # Killed while writing the adapter weights.
    weights = torn_copy(step + 4) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # Killed while writing the state.
    state = torn_copy(step + 6) / "trainer_state.json"
    state.write_text(state.read_text()[:40])

    assert latest_checkpoint(folder) == newest
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == sorted(
        p.name for p in (reference_dir / CHECKPOINTS).glob("checkpoint-*")
    )


def test_a_kill_while_the_adapter_is_saved_is_finished_from_the_last_checkpoint(tmp_path, trained, embedded_base):
    reference_dir, reference = trained
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    # Killed after the last step's checkpoint, while adapter/ was half written: no train.ok yet.
    (run_dir / ADAPTER / DONE).unlink()
    weights = run_dir / ADAPTER / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    result = train(run_dir, embedded_base, CONFIG, progress=False, threads=THREADS)

    assert (result.resumed_from, result.steps) == (CONFIG.max_steps, CONFIG.max_steps)
    assert (run_dir / ADAPTER / DONE).exists()
    assert result.final_loss == reference.final_loss and result.tokens == reference.tokens
    assert [e["step"] for e in log_entries(run_dir)] == list(range(1, CONFIG.max_steps + 1))
    weights, expected = load_file(result.adapter / "adapter_model.safetensors"), load_file(
        reference.adapter / "adapter_model.safetensors")
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_a_finished_run_returns_at_once_without_training(trained, tmp_path):
    run_dir, result = trained
    adapter_bytes = (result.adapter / "adapter_model.safetensors").read_bytes()
    log_before = (run_dir / TRAIN_LOG).read_text()
    # A base that does not exist: loading it would fail, so nothing may be loaded.
    again = train(run_dir, tmp_path / "no-such-model", CONFIG, progress=False)
    assert again == result
    assert (result.adapter / "adapter_model.safetensors").read_bytes() == adapter_bytes
    assert (run_dir / TRAIN_LOG).read_text() == log_before


def test_a_run_without_training_rows_is_refused_with_the_path(tmp_path, embedded_base):
    with pytest.raises(FileNotFoundError, match=r"data/train\.jsonl does not exist; run the merge stage"):
        train(tmp_path / "empty-run", embedded_base, CONFIG, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="unsloth may run on this machine")
def test_unsloth_without_cuda_is_refused_clearly():
    with pytest.raises(RuntimeError, match="no CUDA GPU.*set train.backend to 'auto' or 'trl'"):
        pick_backend("unsloth")
    assert pick_backend("auto") == "trl"


def full_logits_loss(model, batch, replay: torch.Tensor) -> float:
    """The replay-KL loss computed the plain way (whole logits, adapter on and off), to check the trainer's."""
    import torch.nn.functional as F

    target = batch["labels"][:, 1:]
    mask = target != -100
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits[:, :-1].float(), -1)
        with model.disable_adapter():
            base = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits[:, :-1].float(), -1)
    ce = -logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (base.exp() * (base - logprobs)).sum(-1)
    per_token = torch.where(replay[:, None], kl, ce)
    return float((per_token * mask).sum() / mask.sum())


def test_replay_rows_cost_their_kl_to_the_base_and_corrections_their_cross_entropy(tmp_path, trained, embedded_base):
    """The default replay loss: a replay row keeps the base's next-token distributions (KL, adapter off),
    a correction row is learned (cross-entropy); both only on answer tokens."""
    from peft import set_peft_model_state_dict
    from retrain.replay_kl import REPLAY_COLUMN, ReplayKLTrainer

    assert CONFIG.replay_loss == "kl"
    run_dir = make_run(tmp_path / "run")
    trainer = make_trainer(run_dir, embedded_base, CONFIG, load_dataset(run_dir, CONFIG.seed), progress=False)
    assert isinstance(trainer, ReplayKLTrainer)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert sorted(e[REPLAY_COLUMN] for e in examples) == [False] * len(QUESTIONS) + [True] * len(REPLAY)
    batch = trainer.data_collator(examples)
    replay = batch[REPLAY_COLUMN]
    model = trainer.model.eval()

    def loss() -> float:
        with torch.no_grad():
            return float(trainer.compute_loss(model, dict(batch)))

    # A fresh LoRA changes nothing: the replay rows cost nothing, the loss is the corrections' cross-entropy.
    at_start = loss()
    assert at_start == pytest.approx(full_logits_loss(model, batch, replay), rel=1e-4)
    no_correction = {**batch, "labels": batch["labels"].masked_fill(~replay[:, None], -100)}
    with torch.no_grad():
        assert float(trainer.compute_loss(model, no_correction)) == pytest.approx(0.0, abs=1e-6)

    # The trained adapter moved the replay answers' distributions a little: the KL is counted, as computed plainly.
    set_peft_model_state_dict(model, load_file(trained[1].adapter / "adapter_model.safetensors"))
    with torch.no_grad():
        replay_only = float(trainer.compute_loss(model, no_correction))
    assert replay_only > 1e-4
    assert loss() == pytest.approx(full_logits_loss(model, batch, replay), rel=1e-4)


def test_sft_replay_trains_the_replay_answers_with_cross_entropy(tmp_path, embedded_base):
    from trl import SFTTrainer

    from retrain.replay_kl import ReplayKLTrainer

    run_dir = make_run(tmp_path / "run")
    cfg = CONFIG.model_copy(update={"replay_loss": "sft"})
    trainer = make_trainer(run_dir, embedded_base, cfg, load_dataset(run_dir, cfg.seed), progress=False)
    assert isinstance(trainer, SFTTrainer) and not isinstance(trainer, ReplayKLTrainer)
    assert "replay" not in trainer.train_dataset.column_names


def test_the_refit_folder_trains_on_the_held_out_corrections_too(tmp_path):
    from retrain.train import refit_folder

    run_dir = make_run(tmp_path / "run")
    held = [sft_row("Name the capital of Xanadu.", FACT, "correction")]
    (run_dir / "data" / "heldout.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in held))
    folder = refit_folder(run_dir)
    assert folder == run_dir / "refit"
    train_rows = read_rows(run_dir / "data" / "train.jsonl")
    assert read_rows(folder / "data" / "train.jsonl") == train_rows + held
    assert (folder / "data" / "replay.jsonl").read_bytes() == (run_dir / "data" / "replay.jsonl").read_bytes()
    # Written once: a resumed refit trains on the rows it started with.
    before = (folder / "data" / "train.jsonl").stat().st_mtime_ns
    assert refit_folder(run_dir) == folder
    assert (folder / "data" / "train.jsonl").stat().st_mtime_ns == before
