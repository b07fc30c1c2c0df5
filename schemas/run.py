"""A retraining run: its configuration and the manifest that pins its inputs.

A RunManifest is enough to rerun a run: the inputs by content hash, the base model by sha256,
and every setting of every stage.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.flag import _Record, utcnow

RUN_SCHEMA_VERSION = 1

STAGES = ("merge", "train", "gate", "refit", "export", "publish")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeConfig(_Config):
    """merge: accepted corrections -> SFT rows (+ replay, + preference pairs)."""

    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of corrections held out for the gate")
    split_salt: str = Field("flagloop", description="salt of the stable hash that picks the held-out rows")
    replay_ratio: float = Field(1.0, ge=0.0, description="replay rows per correction row")
    replay_source: Literal["self", "dataset", "none"] = Field(
        "self", description="self: the serving model's own answers to general prompts; dataset: replay_dataset"
    )
    replay_dataset: str | None = Field(None, description="Hub SFT dataset for replay, e.g. mlabonne/FineTome-100k")
    replay_max_new_tokens: int = Field(96, ge=1)
    replay_near_share: float = Field(
        0.5, ge=0.0, le=1.0,
        description="share of self-replay prompts picked as the nearest to the corrected prompts (same shape, other "
        "entities: they hold the model's other answers of that shape in place); the rest are picked at random",
    )
    max_correction_chars: int = Field(4000, ge=1, description="longer corrections are rejected with a report")
    min_corrections: int = Field(1, ge=1, description="fewer accepted corrections than this: nothing to train")


class TrainConfig(_Config):
    """train: LoRA on TRL SFTTrainer + PEFT (unsloth on CUDA when installed)."""

    base_model: str | None = Field(
        None, description="HF model id or folder to train on; default: materialised from the serving GGUF"
    )
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = Field(1e-3, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(60, ge=-1, description="-1: train num_epochs instead")
    num_epochs: float = Field(1.0, gt=0)
    max_length: int = Field(256, ge=16, description="tokens per row (prompt + completion)")
    save_steps: int = Field(10, ge=1, description="checkpoint every N steps (resume point after a kill)")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    backend: Literal["auto", "trl", "unsloth"] = Field("auto", description="auto: unsloth when CUDA + unsloth are present")
    report_to: Literal["tensorboard", "trackio", "none"] = "tensorboard"
    hub_checkpoint_repo: str | None = Field(None, description="also push checkpoints to this Hub model repo")
    refit: bool = Field(
        True, description="once the gate passed, train again on every accepted correction (the held-out ones "
        "too) and publish that: the gate needs corrections the model never saw, the served model needs them all",
    )
    replay_loss: Literal["kl", "sft"] = Field(
        "kl", description="kl: replay rows keep the base model's next-token distributions (KL to the base, adapter "
        "off); sft: cross-entropy on the base's greedy replay answers, like the corrections",
    )
    kl_weight: float = Field(1.0, gt=0, description="weight of the replay rows' KL term against the corrections' loss")


class GateConfig(_Config):
    """gate: publish only when held-out corrections improve and unrelated answers stay put."""

    min_heldout_gain: float = Field(0.0, description="required rise of the held-out score (after - before)")
    max_drift: float = Field(0.5, ge=0.0, description="largest allowed rise of mean NLL/token of old answers on drift prompts")
    drift_prompts: int = Field(16, ge=0, description="how many general prompts to measure drift on")
    near_drift_prompts: int = Field(
        8, ge=0, description="how many more drift prompts, picked as the nearest to the corrected prompts: corrections "
        "pull hardest on prompts of their own shape",
    )
    max_prompt_drift: float = Field(
        1.5, ge=0.0, description="largest allowed rise of NLL/token of the old answer on any one drift prompt: a mean "
        "can hide one answer that flipped (e.g. the capital of France now answered with a corrected fact)",
    )
    max_new_tokens: int = Field(48, ge=1, description="greedy answer length compared, in tokens")
    min_heldout_answered: float = Field(
        0.5, ge=0.0, le=1.0, description="share of held-out corrections whose greedy answer from the exported GGUF "
        "must hold the correction's distinctive words",
    )
    max_unrelated_changed: float = Field(
        1.0, ge=0.0, le=1.0, description="largest share of drift prompts whose greedy answer from the exported GGUF "
        "may differ from a zero-LoRA export's at the same type; 1.0: measured and reported, never refused (the default "
        "training still changes most of them: see BENCHMARKS.md, 'Learning that sticks')",
    )


class ExportConfig(_Config):
    """export: merged weights -> GGUF with the serving file's metadata -> quantized."""

    quant: str | None = Field(
        None,
        description="llama.cpp file type, e.g. Q4_1, Q8_0; default: the serving file's, or Q8_0 when the base "
        "weights were dequantized from a lower-bit serving file (re-quantizing to its grid erases the LoRA)",
    )
    verify_probes: int = Field(4, ge=0, description="greedy probes compared between PyTorch and the GGUF")
    verify_max_new_tokens: int = Field(24, ge=1)


class ScheduleConfig(_Config):
    """schedule: when `python -m retrain schedule` ticks, and when a tick starts a run."""

    trigger: Literal["cron", "interval"] = Field("cron", description="cron: at the times of `cron`; interval: every interval_minutes")
    cron: str = Field("0 3 * * *", description="crontab expression (minute hour day month weekday) for trigger 'cron'")
    interval_minutes: float = Field(60.0, gt=0, description="minutes between two ticks for trigger 'interval'")
    timezone: str | None = Field(None, description="IANA time zone of the cron times, e.g. Europe/Paris; default: the machine's")
    min_new_corrections: int = Field(
        10, ge=1, description="accepted corrections the last finished run did not see that it takes to start a new run"
    )
    misfire_grace_seconds: int = Field(3600, ge=1, description="a tick missed (scheduler down) by less than this still runs")
    max_attempts: int = Field(3, ge=1, description="ticks that may fail on one run before it is marked failed")
    jobstore: str | None = Field(None, description="SQLite file of the job store; default: scheduler.sqlite beside runs_dir")
    on_pull_failure: Literal["wait", "train"] = Field(
        "wait", description="when the feedback dataset repo cannot be pulled: wait (no run starts or continues until "
        "a pull gets through; the local copy may lack a reviewer's later reject) or train on the local copy",
    )


class RetrainSettings(_Config):
    """Everything `python -m retrain` needs besides where the data and the registry live."""

    runs_dir: str = Field("data/runs", description="one folder per run: data, checkpoints, reports")
    merge: MergeConfig = MergeConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    schedule: ScheduleConfig = ScheduleConfig()


class InputFile(_Record):
    """One input pinned by content."""

    path: str
    sha256: str
    bytes: int


class BaseModelRef(_Record):
    """The serving GGUF the run starts from."""

    path: str
    sha256: str
    quant: str
    version: str | None = Field(None, description="registry version, None for the configured base")


class RunManifest(_Record):
    """Pins a run: inputs by hash, base model by hash, every stage's settings."""

    schema_version: Literal[1] = RUN_SCHEMA_VERSION
    run_id: str
    created_at: datetime = Field(default_factory=utcnow)
    base: BaseModelRef
    feedback_files: list[InputFile] = Field(description="flag and review shards read, by hash")
    dataset_repo: str | None = None
    dataset_revision: str | None = Field(None, description="Hub dataset commit the inputs came from, when pulled")
    flag_ids: list[str] = Field(default_factory=list, description="accepted flags whose corrections were used")
    counts: dict[str, int] = Field(default_factory=dict, description="rows per file: train, heldout, replay, ...")
    outputs: list[InputFile] = Field(default_factory=list, description="the rows the merge wrote, by hash")
    settings: RetrainSettings
    code_version: str = ""


class RunState(_Record):
    """How far a run got; written after each stage completes."""

    run_id: str
    stage_done: Literal["none", "merge", "train", "gate", "refit", "export", "publish"] = "none"
    verdict: Literal["pending", "publish", "refused", "failed"] = "pending"
    message: str = ""
    version: str | None = Field(None, description="registry version published by this run")
    updated_at: datetime = Field(default_factory=utcnow)
