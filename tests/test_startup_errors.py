"""Start-up failures: `python -m space` with a bad model or setting exits 2 with one clear line.

No traceback, no half-started server: the operator reads what is wrong, with which file or
value, and what to change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from space.model import GGUF_MAGIC, embedded_model_path
from tests.conftest import ROOT, free_port

QUICK_S = 30  # importing gradio and llama.cpp takes ~5 s here; loading nothing must not take longer


def run_space(tmp_path: Path, args: list[str] = (), env: dict | None = None,
              port_arg: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python -m space` to its exit; return the finished process and how long it took.

    A free --port is passed so that, should it start after all, it cannot clash with anything.
    """
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    full_env.pop("FLAGLOOP_CONFIG", None)
    command = [sys.executable, "-m", "space", "--feedback-dir", str(tmp_path / "fb"), *args]
    if port_arg:
        command += ["--port", str(free_port())]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def missing_file(tmp_path: Path) -> Path:
    return tmp_path / "no-such-model.gguf"


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("these are notes, not a model\n")
    return path


def truncated_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    with open(embedded_model_path(), "rb") as f:
        path.write_bytes(f.read(200 * 1024))
    assert path.read_bytes()[:4] == GGUF_MAGIC
    return path


# What each error must say: what is wrong and, where the app knows it, which setting to change.
BAD_MODELS = {
    "missing": (missing_file, ["does not exist", "FLAGLOOP_MODEL_PATH"]),
    "text": (text_file, ["is not a GGUF", "starts with b'thes'", "FLAGLOOP_MODEL_PATH"]),
    "truncated": (truncated_gguf, ["llama.cpp could not load", "corrupt, truncated"]),
}


def assert_one_clear_line(done: subprocess.CompletedProcess, elapsed: float) -> str:
    """Exit code 2, quickly, one line on stderr and no traceback; return that line."""
    assert done.returncode == 2, f"exit code {done.returncode}, stderr:\n{done.stderr}"
    assert elapsed < QUICK_S, f"took {elapsed:.1f}s to fail"
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert lines[0].startswith("flagloop: ")
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_bad_model_file_exits_2_with_one_line_naming_the_file(tmp_path, case):
    make, expected = BAD_MODELS[case]
    path = make(tmp_path)
    done, elapsed = run_space(tmp_path, env={"FLAGLOOP_MODEL_PATH": str(path)})
    line = assert_one_clear_line(done, elapsed)
    assert repr(str(path)) in line, f"the error does not name the file: {line}"
    assert [words for words in expected if words not in line] == [], line
    assert not (tmp_path / "fb").exists(), "a failed start created the feedback folder"


def test_a_bad_model_path_given_on_the_command_line_fails_the_same_way(tmp_path):
    path = text_file(tmp_path)
    done, elapsed = run_space(tmp_path, args=["--model-path", str(path)])
    line = assert_one_clear_line(done, elapsed)
    assert repr(str(path)) in line and "is not a GGUF" in line


def test_a_truncated_model_error_says_what_to_do(tmp_path):
    done, elapsed = run_space(tmp_path, env={"FLAGLOOP_MODEL_PATH": str(truncated_gguf(tmp_path))})
    assert "FLAGLOOP_MODEL_PATH" in assert_one_clear_line(done, elapsed)


def test_an_invalid_port_setting_exits_2_naming_the_setting_and_value(tmp_path):
    # No --port argument: it would win over the variable.
    done, elapsed = run_space(tmp_path, env={"FLAGLOOP_PORT": "notaport"}, port_arg=False)
    assert done.returncode == 2, f"exit code {done.returncode}, stderr:\n{done.stderr}"
    assert elapsed < QUICK_S
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.startswith("flagloop: invalid settings")
    assert "port" in done.stderr and "'notaport'" in done.stderr and "valid integer" in done.stderr


def test_an_invalid_setting_error_is_one_line_naming_the_environment_variable(tmp_path):
    done, elapsed = run_space(tmp_path, env={"FLAGLOOP_N_THREADS": "zero"})
    line = assert_one_clear_line(done, elapsed)
    assert "FLAGLOOP_N_THREADS" in line and "'zero'" in line
