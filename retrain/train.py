"""train: a LoRA adapter on a run's SFT rows (TRL SFTTrainer + PEFT; unsloth on CUDA), resumable after a kill.

    >>> result = train(Path("data/runs/r1"), base_folder, TrainConfig(max_steps=60))
    >>> result.adapter          # data/runs/r1/adapter: PEFT save_pretrained format
    >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), result.adapter)

Reads ``data/train.jsonl`` and ``data/replay.jsonl`` of the run folder, writes ``checkpoints/``
(every ``save_steps``), ``train_log.jsonl`` (one line per step, for the loss curve), ``tb/``
(TensorBoard) and, last, ``adapter/`` with its marker ``adapter/train.ok``.

Killed at any moment, the same call picks up from the newest complete checkpoint and ends with
the adapter an uninterrupted run would have made (same rows, same config: the manifest pins
both). A checkpoint folder that was being written when the process died is removed, never
resumed from. Once ``adapter/train.ok`` exists the call returns at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from schemas.run import TrainConfig
from schemas.sft import SFTRow

log = logging.getLogger(__name__)

ADAPTER = "adapter"
DONE = "train.ok"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD = "tb"
DATA_FILES = ("data/train.jsonl", "data/replay.jsonl")
HELDOUT_FILE = "data/heldout.jsonl"
REFIT = "refit"  # the run folder's sub-folder where the refit on every correction trains
# Files a checkpoint needs to resume from; the Trainer writes trainer_state.json last.
CHECKPOINT_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
)
# What a checkpoint holds besides the adapter and tokenizer files.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin")


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run made, also stored in ``adapter/train.ok``."""

    adapter: Path
    steps: int
    final_loss: float | None
    tokens: int = 0  # non-padding tokens trained on (prompt + completion), over the whole run
    seconds: float = 0.0  # wall time of the call that finished the run
    resumed_from: int | None = None  # checkpoint step that call resumed from
    backend: str = "trl"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "adapter": str(self.adapter)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainResult:
        fields = json.loads(text)
        return cls(**{**fields, "adapter": Path(fields["adapter"])})


def train(
    run_dir: Path,
    base: str | Path,
    cfg: TrainConfig,
    progress: bool = True,
    threads: int | None = None,
    callbacks: Iterable[Any] = (),
) -> TrainResult:
    """Train (or finish training) the run's LoRA adapter; returns at once when it is already done.

    ``base`` is an HF model folder or id (see ``retrain.base.base_folder``); ``threads`` caps torch's
    CPU threads (default: the cores this process may use); ``callbacks`` are extra
    ``transformers.TrainerCallback``s (progress in a UI, measurements).
    """
    run_dir = Path(run_dir)
    adapter = run_dir / ADAPTER
    if (adapter / DONE).exists():
        log.info("%s is already trained (%s exists): nothing to do", run_dir, adapter / DONE)
        # The stored path may be from before the run folder moved.
        return replace(TrainResult.from_json((adapter / DONE).read_text()), adapter=adapter)
    started = time.monotonic()

    import torch

    torch.set_num_threads(threads or usable_cores())
    backend = pick_backend(cfg.backend)
    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS)
    resumed_from = checkpoint_step(checkpoint) if checkpoint else None
    # Steps after the checkpoint are trained again: forget their log lines so each step has one.
    trim_train_log(run_dir / TRAIN_LOG, keep_up_to=resumed_from or 0)
    if checkpoint and is_final(checkpoint, cfg):
        # Killed after the last checkpoint, while the adapter was being saved. Resuming the Trainer
        # from its last step would train one step more (it checks max_steps only after a step).
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        result = make_result(adapter, state["global_step"], state["log_history"],
                             state.get("num_input_tokens_seen", 0), started, resumed_from, backend)
        save_adapter_from_checkpoint(checkpoint, adapter, result)
        log.info("%s was complete: adapter taken from %s", run_dir, checkpoint)
        return result

    dataset = load_dataset(run_dir, cfg.seed)
    trainer = make_trainer(run_dir, base, cfg, dataset, backend, progress, callbacks, resumed_from or 0)
    if checkpoint:
        log.info("resuming %s from %s", run_dir, checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    state = trainer.state
    result = make_result(adapter, state.global_step, state.log_history, state.num_input_tokens_seen, started,
                         resumed_from, backend)
    save_adapter(trainer, adapter, result)
    log.info("trained %s: %d steps, final loss %s, %.0f s", adapter, result.steps, result.final_loss, result.seconds)
    return result


def make_result(adapter: Path, steps: int, log_history: list[dict], tokens: int, started: float,
                resumed_from: int | None, backend: str) -> TrainResult:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return TrainResult(
        adapter=adapter,
        steps=steps,
        final_loss=losses[-1] if losses else None,
        tokens=int(tokens),
        seconds=round(time.monotonic() - started, 3),
        resumed_from=resumed_from,
        backend=backend,
    )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pick_backend(requested: str) -> str:
    """'unsloth' or 'trl': auto takes unsloth only where it can run (a CUDA GPU and the package imports)."""
    import torch

    if requested == "trl":
        return "trl"
    cuda = torch.cuda.is_available()
    if requested == "unsloth":
        if not cuda:
            raise RuntimeError(
                "train.backend is 'unsloth', but torch sees no CUDA GPU (torch.cuda.is_available() is False): "
                "set train.backend to 'auto' or 'trl' to train with TRL + PEFT here"
            )
        try:
            import unsloth  # noqa: F401  imported before the models are built, so that its patches apply
        except Exception as err:
            raise RuntimeError(
                f"train.backend is 'unsloth', but unsloth does not import ({err!r}): "
                "install requirements-gpu.txt, or set train.backend to 'auto' or 'trl'"
            ) from err
        return "unsloth"
    if requested != "auto":
        raise ValueError(f"unknown train.backend {requested!r}: use 'auto', 'trl' or 'unsloth'")
    if cuda and importlib.util.find_spec("unsloth") is not None:
        try:
            import unsloth  # noqa: F401
            return "unsloth"
        except Exception as err:  # a broken GPU install should not stop training: TRL does the same job
            log.warning("unsloth is installed but does not import (%r): training with TRL + PEFT", err)
    return "trl"


def read_rows(path: Path) -> list[SFTRow]:
    """SFT rows of one JSONL file; a line that is not an SFTRow stops the run with its place."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(SFTRow.model_validate_json(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not an SFT row ({err}); rerun the merge stage") from None
    return rows


def load_dataset(run_dir: Path, seed: int):
    """The run's training and replay rows as a TRL conversational prompt-completion Dataset, shuffled by seed.

    Each row also has the column ``replay`` (True for a replay row), which ReplayKLTrainer reads."""
    from datasets import Dataset

    from retrain.replay_kl import REPLAY_COLUMN

    train_file = run_dir / DATA_FILES[0]
    if not train_file.exists():
        raise FileNotFoundError(f"no training rows: {train_file} does not exist; run the merge stage first")
    rows = read_rows(train_file)
    if not rows:
        raise ValueError(f"no training rows: {train_file} is empty; there is nothing to train on")
    replay_file = run_dir / DATA_FILES[1]
    replay = read_rows(replay_file) if replay_file.exists() else []
    log.info("training on %d correction rows and %d replay rows", len(rows), len(replay))
    records = [{**row.model_dump(include={"prompt", "completion"}), REPLAY_COLUMN: row.meta.source == "replay"}
               for row in rows + replay]
    return Dataset.from_list(records).shuffle(seed=seed)


def refit_folder(run_dir: Path) -> Path:
    """``run_dir/refit``, a run folder of its own whose training rows are the run's train + held-out rows.

    The gate judged a model trained without the held-out corrections; the version people get should
    know them too. Same replay rows, same settings: ``train(refit_folder(run_dir), …)`` is the same
    recipe on every accepted correction, resumable like the first training. Its data files are written
    once (the same bytes on every call), so a resumed refit trains on what it started with.
    """
    from feedback.files import write_atomic

    run_dir = Path(run_dir)
    folder = run_dir / REFIT
    for name, sources in ((DATA_FILES[0], (DATA_FILES[0], HELDOUT_FILE)), (DATA_FILES[1], (DATA_FILES[1],))):
        target = folder / name
        if not target.exists():
            parts = [(run_dir / source).read_bytes() for source in sources if (run_dir / source).exists()]
            write_atomic(target, b"".join(p if p.endswith(b"\n") or not p else p + b"\n" for p in parts))
    return folder


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def checkpoint_problem(folder: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it is complete and loads."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json does not parse: {err}"
    if state.get("global_step") != checkpoint_step(folder):
        return f"trainer_state.json is for step {state.get('global_step')}"
    try:
        from safetensors.torch import load_file

        load_file(folder / "adapter_model.safetensors")
    except Exception as err:  # safetensors raises its own error types for torn files
        return f"adapter_model.safetensors does not load: {err}"
    return None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder``; incomplete ones (a kill while saving) are removed."""
    candidates = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for checkpoint in sorted(candidates, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        # Left in place, the Trainer's checkpoint rotation could keep it in place of a good one.
        log.warning("removing incomplete checkpoint %s (%s): it was being written when training stopped",
                    checkpoint, problem)
        shutil.rmtree(checkpoint)
    return None


def trim_train_log(path: Path, keep_up_to: int) -> None:
    """Keep the log lines of steps up to ``keep_up_to`` (and drop a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("step", 0) <= keep_up_to:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def make_trainer(
    run_dir: Path,
    base: str | Path,
    cfg: TrainConfig,
    dataset,
    backend: str = "trl",
    progress: bool = True,
    callbacks: Iterable[Any] = (),
    first_step: int = 0,
):
    """The SFTTrainer for this run: model + LoRA from ``backend``, settings from ``cfg``, our log callbacks."""
    import torch
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    peft_config = None
    if backend == "unsloth":
        model, tokenizer = load_unsloth(base, cfg)
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if bf16 else torch.float32)
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
        )

    report_to, extra = reporting(run_dir, cfg.report_to, first_step)
    hub = (
        {"push_to_hub": True, "hub_model_id": cfg.hub_checkpoint_repo, "hub_strategy": "checkpoint",
         "hub_private_repo": True}
        if cfg.hub_checkpoint_repo else {}
    )
    args = SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        # transformers 5 reads a warmup_steps below 1 as a share of all steps
        warmup_steps=min(cfg.warmup_ratio, 0.999),
        seed=cfg.seed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the newest, and the one before in case the newest is torn
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",  # kept in the checkpoints, unlike SFTTrainer's num_tokens
        report_to=report_to,
        disable_tqdm=not progress,
        # TRL defaults to bf16 autocast and gradient checkpointing: on CPU the first is slow and lossy and
        # the second buys memory a small model does not need; unsloth checkpoints activations its own way.
        bf16=bf16,
        activation_checkpointing=cuda and backend == "trl",  # transformers 5's name for gradient checkpointing
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        **hub,
    )
    from retrain.replay_kl import REPLAY_COLUMN, ReplayKLTrainer

    common = dict(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                  callbacks=[train_log_callback(run_dir / TRAIN_LOG), *extra, *callbacks])
    if cfg.replay_loss == "kl" and any(dataset[REPLAY_COLUMN]):
        return ReplayKLTrainer(train_dataset=dataset, kl_weight=cfg.kl_weight, **common)
    return SFTTrainer(train_dataset=dataset.remove_columns(REPLAY_COLUMN), **common)


def load_unsloth(base: str | Path, cfg: TrainConfig):
    """Model and tokenizer from unsloth (CUDA only), already wrapped in the LoRA of ``cfg``."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(base), max_seq_length=cfg.max_length, dtype=None, load_in_4bit=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora_r,
        target_modules=list(cfg.target_modules),
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_gradient_checkpointing="unsloth",
        random_state=cfg.seed,
    )
    return model, tokenizer


def reporting(run_dir: Path, report_to: str, first_step: int) -> tuple[str, list]:
    """(report_to for the Trainer, callbacks we add): TensorBoard writes to run_dir/tb."""
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step drops the events of steps that are trained again after a resume
        writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD), purge_step=first_step + 1 if first_step else None)
        return "none", [TensorBoardCallback(tb_writer=writer)]
    if report_to == "trackio" and importlib.util.find_spec("trackio") is None:
        raise RuntimeError("train.report_to is 'trackio', but the trackio package is not installed: "
                           "pip install trackio, or set train.report_to to 'tensorboard' or 'none'")
    return report_to, []


def train_log_callback(path: Path):
    """A TrainerCallback appending {"step", "loss", "lr", "tokens", "time"} to ``path`` at each training log.

    Built on call so that importing this module does not import transformers before unsloth can patch it.
    """
    from transformers import TrainerCallback

    class TrainLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            entry = {
                "step": state.global_step,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "tokens": int(state.num_input_tokens_seen),
                "time": round(time.time(), 3),  # unix seconds
            }
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    return TrainLog()


def is_final(checkpoint: Path, cfg: TrainConfig) -> bool:
    """Whether this (complete) checkpoint is the one saved after the run's last step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    last = cfg.max_steps if cfg.max_steps > 0 else state.get("max_steps", 0)
    return last > 0 and state["global_step"] >= last


def save_adapter(trainer, adapter: Path, result: TrainResult) -> None:
    """Write the final adapter beside its place, move it in whole, then mark it done."""
    tmp = adapter.with_name(adapter.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    trainer.processing_class.save_pretrained(str(tmp))
    publish_adapter(tmp, adapter, result)


def save_adapter_from_checkpoint(checkpoint: Path, adapter: Path, result: TrainResult) -> None:
    """The final adapter copied out of the last checkpoint (the same weights and tokenizer files)."""
    tmp = adapter.with_name(adapter.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(*TRAINING_STATE))
    publish_adapter(tmp, adapter, result)


def publish_adapter(tmp: Path, adapter: Path, result: TrainResult) -> None:
    shutil.rmtree(adapter, ignore_errors=True)  # an adapter without train.ok is from a run killed while moving it
    os.replace(tmp, adapter)
    marker = adapter / (DONE + ".tmp")
    marker.write_text(result.to_json())
    os.replace(marker, adapter / DONE)
