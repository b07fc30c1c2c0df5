"""Settings: embedded defaults, environment variables, the TOML file, and clear refusals."""

import pytest
from pydantic import ValidationError

from schemas.settings import DEFAULT_SYSTEM_PROMPT, Settings
from space.model import ModelFile, embedded_model_path, resolve_model


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("FLAGLOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_nothing_configured_serves_the_embedded_model_and_a_local_folder():
    s = Settings()
    assert s.model_path is None and s.model_repo is None
    assert str(s.feedback_dir) == "data/feedback" and s.system_prompt == DEFAULT_SYSTEM_PROMPT
    file = resolve_model(s)
    assert file == ModelFile(embedded_model_path(), "embedded") and file.path.is_file()


def test_environment_variables_override_defaults(monkeypatch):
    monkeypatch.setenv("FLAGLOOP_PORT", "9000")
    monkeypatch.setenv("FLAGLOOP_GENERATION__TEMPERATURE", "0.1")
    s = Settings()
    assert s.port == 9000 and s.generation.temperature == 0.1 and s.generation.top_p == 0.95


def test_toml_file_is_read_and_env_wins_over_it(tmp_path, monkeypatch):
    (tmp_path / "flagloop.toml").write_text('port = 7000\nsystem_prompt = "Be brief."\n[generation]\nseed = 3\n')
    monkeypatch.setenv("FLAGLOOP_PORT", "7001")
    s = Settings()
    assert (s.port, s.system_prompt, s.generation.seed) == (7001, "Be brief.", 3)


def test_config_file_path_comes_from_flagloop_config(tmp_path, monkeypatch):
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text('max_message_chars = 99\n')
    monkeypatch.setenv("FLAGLOOP_CONFIG", str(cfg))
    assert Settings().max_message_chars == 99


def test_repo_without_file_is_refused_with_what_to_set():
    with pytest.raises(ValidationError, match="FLAGLOOP_MODEL_FILE"):
        Settings(model_repo="someone/model-GGUF")


def test_unknown_setting_is_refused(tmp_path):
    (tmp_path / "flagloop.toml").write_text("prot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings()
