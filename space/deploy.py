"""Deploy the app as a Gradio Space on the Hugging Face Hub: `python -m space deploy --repo owner/name`.

    >>> result = deploy("me/flagloop", token="hf_…", secrets={"HF_TOKEN": "hf_…"},
    ...                 variables={"FLAGLOOP_DATASET_REPO": "me/flagloop-feedback"})
    >>> result.summary()
    'Space me/flagloop: commit 3f2a9c1e0b7d, 4 files changed, 0 deleted; secrets set: HF_TOKEN; …'

What the Space gets (`build_space_folder`, also what `--dry-run` shows):

- the app's packages `space/`, `feedback/`, `schemas/`, and the few other first-party modules they
  import (today `retrain/registry.py` and `retrain/model_card.py`: the registry the app follows),
  found by reading their imports, so the training code never ships;
- `app.py`, which Spaces run: `space.__main__.serve` on 0.0.0.0:7860, the same start-up as `python -m space`;
- `requirements.txt`: the project's requirements.txt without its "Retraining" section (torch, TRL, …),
  with gradio's `oauth` extra for the review page's "Sign in with Hugging Face";
- `README.md`: the Spaces front matter (sdk gradio at the installed version, `hf_oauth: true`) and the
  secrets and variables the Space reads.

A deploy is one commit holding only what changed: files the Space already has byte for byte are left
out, files a previous deploy shipped that no longer exist here are deleted, and when nothing changed no
commit is made at all. Secrets and variables are set before that commit, so the build it starts has them.
Secret values are sent to the Hub and nowhere else: never printed, logged or kept in the result.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("space", "feedback", "schemas")  # shipped whole
SPACE_FILES = ("app.py", "README.md", "requirements.txt")  # written for the Space
TRAINING_SECTION = "Retraining"  # the requirements.txt section (a comment block) the Space does without
SKIPPED = re.compile(r"(^|/)(__pycache__|\.[^/]*)(/|$)|\.py[co]$")  # caches and hidden files never ship
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_LIKE = re.compile(r"TOKEN|PASSWORD|SECRET|REVIEWERS$")  # names whose values must not be public variables

APP_PY = '''"""The flagloop Space: chat with the model and flag its answers (written by `python -m space deploy`).

Settings come from the Space's variables and secrets (FLAGLOOP_*, HF_TOKEN): see README.md.
`python app.py --check` builds the app (settings, model, store, pages) and exits without serving.
"""

import sys

from space.__main__ import serve

if __name__ == "__main__":
    sys.exit(serve({"host": "0.0.0.0", "port": 7860}, check="--check" in sys.argv[1:]))  # where Spaces look
'''

README_BODY = """
# {title}

A flagloop Space: chat with a small GGUF model (llama-cpp-python) and flag its wrong
answers; reviewers accept, reject or correct the flags on `/review`. Deployed with
`python -m space deploy --repo {repo_id}`; run it again to update this Space.

## Secrets (Settings → Variables and secrets)

- `HF_TOKEN`: a token with write access to the dataset repo below (and read access to a private model repo).
- `FLAGLOOP_REVIEWERS` (optional): local reviewer accounts, JSON `{{"ana": "password"}}`.

## Variables

- `FLAGLOOP_DATASET_REPO`: the Hub dataset repo `owner/name` the flags and review decisions are pushed to
  (created private if missing), and restored from when the Space restarts on an empty disk. Without it
  they live only in the Space's disk and are lost when it restarts.
- `FLAGLOOP_REGISTRY_REPO`: the Hub model repo the retraining host publishes its versions to. The Space
  serves its current version (downloaded at start-up, sha256-checked), checks `current.json` every
  `FLAGLOOP_REGISTRY_POLL_SECONDS` (10) and swaps a new version (or a rollback) in between answers.
  Unset, or before anything is published: the model below.
- `FLAGLOOP_MODEL_REPO`, `FLAGLOOP_MODEL_FILE` (and `FLAGLOOP_MODEL_REVISION`): the GGUF to serve when the
  registry has nothing yet. Unset: the embedded SmolLM2-135M-Instruct.
- `FLAGLOOP_REVIEWER_ALLOWLIST`: Hugging Face usernames (`a,b,c`) who may open `/review` with
  "Sign in with Hugging Face" (this README turns on `hf_oauth`).
- `FLAGLOOP_FEEDBACK_DIR` (optional): `/data/feedback` with persistent storage.
- Any other `FLAGLOOP_*` setting of the project's README works the same way.

## Build

`requirements.txt` is the app's runtime only (no training stack). The Space builds
`{llama}` from source on its first build, which takes several minutes on CPU hardware.
"""


class DeployError(Exception):
    """A deploy that cannot go on; the message is one line saying what was wrong and what to do."""


@dataclass
class DeployResult:
    """What a deploy did (names of secrets and variables only: values are never kept)."""

    repo_id: str
    url: str  # the Space's page
    commit: str  # the Space's head after the deploy
    committed: bool  # False: the Space already had exactly these files, no commit was made
    changed: list[str] = field(default_factory=list)  # files added or changed by the commit
    deleted: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.committed:
            what = f"commit {self.commit[:12]}, {len(self.changed)} files changed, {len(self.deleted)} deleted"
        else:
            what = f"already up to date at {self.commit[:12]}, no commit"
        parts = [f"Space {self.repo_id}: {what}"]
        if self.secrets:
            parts.append(f"secrets set: {', '.join(self.secrets)}")
        if self.variables:
            parts.append(f"variables set: {', '.join(self.variables)}")
        return "; ".join(parts + self.notes) + f"\n{self.url}"


# -- what the Space holds ---------------------------------------------------------------------------


def check_repo_id(repo: str, what: str = "Space repo") -> str:
    """A repo id, checked: 'owner/name' (letters, digits, '-', '_', '.'); DeployError naming `what` otherwise."""
    flag = "--repo" if what == "Space repo" else f"--{what.removeprefix('FLAGLOOP_').lower().replace('_', '-')}"
    if not isinstance(repo, str) or not REPO_ID.fullmatch(repo) or ".." in repo or repo.endswith((".", "-")):
        raise DeployError(f"{what} {repo!r} is not 'owner/name': pass e.g. {flag} your-name/flagloop")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise DeployError(
            f"{what} {repo!r} is not a valid Hub repo id ({err}): pass e.g. {flag} your-name/flagloop"
        ) from err
    return repo


def runtime_requirements(requirements: Path) -> list[str]:
    """The requirement lines the Space installs: requirements.txt without its training section.

    requirements.txt is read as sections, a comment block and the requirements after it; the section
    whose comment starts with "Retraining" is dropped. gradio gets its `oauth` extra (authlib,
    itsdangerous), which the review page's Hugging Face login needs on a Space.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    kept, section, in_comment, found = [], "", False, False
    for number, raw in enumerate(requirements.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            if not in_comment:  # a comment after requirements starts a new section
                section = line.lstrip("#").strip()
                found = found or section.startswith(TRAINING_SECTION)
            in_comment = True
            continue
        in_comment = False
        if not line or section.startswith(TRAINING_SECTION):
            continue
        try:
            req = Requirement(line.split(" #")[0].strip())
        except InvalidRequirement as err:
            raise DeployError(f"{requirements}:{number}: {line!r} is not a requirement ({err})") from err
        if req.name.lower() == "gradio":
            req.extras = set(req.extras) | {"oauth"}
        kept.append(str(req))
    if not found:
        raise DeployError(
            f"{requirements} has no '# {TRAINING_SECTION}' section: the Space would install the training stack; "
            f"put torch, TRL and the other training requirements under a comment starting with '# {TRAINING_SECTION}'"
        )
    return kept


def training_modules(requirements: Path) -> set[str]:
    """The import names of the training section's packages (torch, trl, …), which shipped code must not import."""
    from packaging.requirements import Requirement

    every = {Requirement(r.split(" #")[0].strip()).name for r in _requirement_lines(requirements)}
    runtime = {Requirement(r).name for r in runtime_requirements(requirements)}
    return {name.lower().replace("-", "_") for name in every - runtime}


def _requirement_lines(requirements: Path) -> list[str]:
    return [ln.strip() for ln in requirements.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _imports(path: Path, module_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for each absolute import of a Python file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = []
    stack = list(tree.body)
    while stack:  # walk the tree; with module_level_only, not into functions (lazy imports)
        node = stack.pop()
        nodes.append(node)
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def app_files(root: Path = ROOT) -> list[str]:
    """The project files the Space needs (paths relative to root): PACKAGES whole, and what they import.

    Other first-party modules are followed through their imports (also those inside functions) and
    shipped with the `__init__.py` of their packages, nothing else of those packages.
    """
    files = {
        p.relative_to(root).as_posix()
        for package in PACKAGES
        for p in (root / package).rglob("*")
        if p.is_file() and not SKIPPED.search(p.relative_to(root).as_posix())
    }
    first_party = {p.parent.name for p in root.glob("*/__init__.py")}
    todo = [root / f for f in files if f.endswith(".py")]
    while todo:
        for module, names in _imports(todo.pop()):
            if module.split(".")[0] not in first_party or module.split(".")[0] in PACKAGES:
                continue
            wanted = [module] + [f"{module}.{name}" for name in names]  # `from pkg import submodule`
            for name in wanted:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # the module and its packages' __init__.py
                    path = _module_file(root, ".".join(parts[:i]))
                    rel = path.relative_to(root).as_posix() if path else None
                    if rel and rel not in files:
                        files.add(rel)
                        todo.append(path)
    return sorted(files)


def front_matter(repo_id: str) -> str:
    """The README's YAML front matter: what Spaces read to build and run the app."""
    from huggingface_hub import SpaceCardData

    data = SpaceCardData(
        title=repo_id.split("/")[1],
        emoji="🚩",
        colorFrom="yellow",
        colorTo="red",
        sdk="gradio",
        sdk_version=importlib.metadata.version("gradio"),  # the Gradio this app was tested with
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        pinned=False,
        license="apache-2.0",
        # "Sign in with Hugging Face" on /review; the default scopes (openid profile) give the username it checks.
        hf_oauth=True,
        short_description="Chat with a small model and flag its wrong answers",
    )
    return data.to_yaml()


def readme(repo_id: str, requirements: list[str]) -> str:
    llama = next((r for r in requirements if r.lower().startswith("llama-cpp-python")), "llama-cpp-python")
    body = README_BODY.format(title=repo_id.split("/")[1], repo_id=repo_id, llama=llama)
    return f"---\n{front_matter(repo_id)}\n---\n{body}"


def build_space_folder(dest: Path, repo_id: str, root: Path = ROOT) -> list[str]:
    """Write everything the Space holds into dest; return the paths (relative to dest), sorted.

    DeployError when the requirements have no training section, when installed gradio is not the one
    requirements.txt pins, or when shipped code imports a training package at module level.
    """
    requirements = runtime_requirements(root / "requirements.txt")
    installed = importlib.metadata.version("gradio")
    pinned = next((r for r in requirements if re.match(r"gradio\[", r)), "")
    if pinned and not pinned.endswith(f"=={installed}"):
        raise DeployError(
            f"requirements.txt pins {pinned!r} but gradio {installed} is installed: the Space's sdk_version would "
            "differ from its requirements; install requirements.txt (make demo) and deploy again"
        )
    files = app_files(root)
    banned = training_modules(root / "requirements.txt")
    for rel in files:
        if rel.endswith(".py"):
            bad = sorted({m.split(".")[0] for m, _ in _imports(root / rel, module_level_only=True)} & banned)
            if bad:
                raise DeployError(
                    f"{rel} imports {', '.join(bad)} at module level, which the Space does not install "
                    "(requirements.txt's Retraining section): import it inside the function that needs it"
                )
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    (dest / "app.py").write_text(APP_PY)
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (dest / "README.md").write_text(readme(repo_id, requirements), encoding="utf-8")
    return sorted(files + list(SPACE_FILES))


def managed(path: str, shipped: list[str]) -> bool:
    """Whether a path of the Space is one deploy owns: a Space file or under a shipped top folder."""
    tops = {p.split("/")[0] for p in shipped if "/" in p}
    return path in SPACE_FILES or path.split("/")[0] in tops


# -- settings the Space reads -------------------------------------------------------------------------


def parse_assignments(items: list[str], kind: str, environ=os.environ) -> dict[str, str]:
    """NAME=VALUE items (a bare NAME takes the value of that environment variable) as a dict."""
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not ENV_NAME.fullmatch(name):
            raise DeployError(f"--{kind} {name!r}: give NAME=VALUE, NAME a variable name like FLAGLOOP_DATASET_REPO")
        if not sep:
            if name not in environ:
                raise DeployError(f"--{kind} {name}: no value given and ${name} is not set; give {name}=VALUE")
            value = environ[name]
        found[name] = value
    return found


def check_setting_names(names) -> None:
    """DeployError for a FLAGLOOP_* name that is no setting (a typo would be silently ignored by the Space)."""
    from schemas.settings import Settings

    fields = set(Settings.model_fields)
    for name in names:
        if not name.startswith("FLAGLOOP_") or name == "FLAGLOOP_CONFIG":
            continue
        key = name[len("FLAGLOOP_"):].lower().split("__")[0]
        if key not in fields:
            known = ", ".join(f"FLAGLOOP_{f.upper()}" for f in sorted(fields))
            raise DeployError(f"{name} is not a flagloop setting; the settings are {known}")


def check_public(variables: dict[str, str]) -> None:
    """Variables are public: refuse one whose name says it holds a token or a password."""
    for name in variables:
        if SECRET_LIKE.search(name):
            raise DeployError(
                f"{name} holds a token or passwords and Space variables are public: pass it with --secret"
            )


# -- the Hub --------------------------------------------------------------------------------------


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def plan_commit(folder: Path, shipped: list[str], remote: dict[str, object]) -> tuple[list[str], list[str]]:
    """(files to add or change, files to delete): compared with the Space's files by content id.

    `remote` maps each path of the Space to its huggingface_hub RepoFile (blob_id, lfs.sha256).
    """
    changed = []
    for rel in shipped:
        data = (folder / rel).read_bytes()
        there = remote.get(rel)
        lfs = getattr(there, "lfs", None)
        if there is None:
            changed.append(rel)
        elif lfs is not None:
            if lfs.sha256 != hashlib.sha256(data).hexdigest():
                changed.append(rel)
        elif there.blob_id != _git_blob_id(data):
            changed.append(rel)
    deleted = sorted(p for p in remote if managed(p, shipped) and p not in shipped)
    return changed, deleted


def source_revision(root: Path = ROOT) -> str | None:
    """The git commit the files come from ('+dirty' with local changes), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def deploy(
    repo: str,
    *,
    token: str | None,
    private: bool | None = None,
    secrets: dict[str, str] | None = None,
    variables: dict[str, str] | None = None,
    root: Path = ROOT,
    message: str | None = None,
) -> DeployResult:
    """Create the Space if missing, set its secrets and variables, and commit what changed (see the module doc).

    `private` applies when the Space is created (None: the Hub's default); an existing Space keeps its
    visibility. huggingface_hub errors and network errors propagate (see `describe_error`).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    check_repo_id(repo)
    secrets, variables = dict(secrets or {}), dict(variables or {})
    check_setting_names([*secrets, *variables])
    check_public(variables)
    if not token:
        raise DeployError(
            "no Hub token: pass --token, set HF_TOKEN, or run `hf auth login` (a token with write access)"
        )
    api = HfApi(token=token, library_name="flagloop")
    with tempfile.TemporaryDirectory(prefix="flagloop-space-") as tmp:
        folder = Path(tmp)
        shipped = build_space_folder(folder, repo, root)
        url = api.create_repo(repo, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        info = api.repo_info(repo, repo_type="space")
        notes = []
        if private is not None and info.private is not None and info.private != private:
            notes.append(f"the Space stays {'private' if info.private else 'public'} (change it in its settings)")
        # Before the commit, so the build it starts already reads them.
        for name, value in secrets.items():
            api.add_space_secret(repo, name, value)
        for name, value in variables.items():
            api.add_space_variable(repo, name, value)
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo, repo_type="space", revision=info.sha, recursive=True)
            if isinstance(entry, RepoFile)
        }
        changed, deleted = plan_commit(folder, shipped, remote)
        result = DeployResult(repo, _space_page(url, repo), info.sha, False, secrets=list(secrets),
                              variables=list(variables), notes=notes)
        if not changed and not deleted:
            return result
        operations = [CommitOperationAdd(rel, str(folder / rel)) for rel in changed]
        operations += [CommitOperationDelete(rel) for rel in deleted]
        source = source_revision(root)
        what = f"{len(changed)} files added or changed, {len(deleted)} deleted"
        commit = api.create_commit(
            repo,
            operations,
            commit_message=message or f"Deploy flagloop{f' {source}' if source else ''}",
            commit_description=f"python -m space deploy: {what}",
            repo_type="space",
            parent_commit=info.sha,  # a push landing meanwhile fails this commit (412) instead of being mixed in
        )
    result.commit, result.committed, result.changed, result.deleted = commit.oid, True, changed, deleted
    return result


def _space_page(url, repo: str) -> str:
    endpoint = getattr(url, "endpoint", None) or "https://huggingface.co"
    return f"{endpoint.rstrip('/')}/spaces/{repo}"


def describe_error(err: BaseException, repo: str, endpoint: str) -> str:
    """One line saying what went wrong talking to the Hub, and what to do."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    server = " ".join((getattr(err, "server_message", None) or "").split())
    said = f": {server}" if server else ""
    if isinstance(err, httpx2.TimeoutException):
        return f"the Hub at {endpoint} did not answer in time ({type(err).__name__}); check HF_ENDPOINT, or retry later"
    if isinstance(err, httpx2.ConnectError):
        first = " ".join(str(err).split()) or "connection refused"
        return f"cannot reach the Hub at {endpoint} ({first}); check your connection and HF_ENDPOINT"
    if isinstance(err, httpx2.TransportError):
        return f"the connection to the Hub at {endpoint} broke off ({type(err).__name__}); retry"
    if status == 401:
        return (f"the Hub refused the token (HTTP 401{said}): pass --token or set HF_TOKEN to a valid token "
                "with write access")
    if status == 403:
        return (f"the token may not create or write to Space {repo} (HTTP 403{said}): use a token with write "
                f"access to {repo.split('/')[0]}")
    if status == 404:
        return f"Space {repo} not found and not created (HTTP 404{said}): check --repo and the token's namespace"
    if status == 412:
        return f"another commit landed on Space {repo} during the deploy (HTTP 412): deploy again"
    if isinstance(err, HfHubHTTPError) and status is not None:
        return f"the Hub answered HTTP {status}{said}; retry later"
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m space deploy`: 0 when deployed, 2 (and one line on stderr saying why) when not."""
    parser = argparse.ArgumentParser(
        prog="python -m space deploy",
        description="Upload the app as a Gradio Space on the Hugging Face Hub (one commit, only what changed).",
    )
    parser.add_argument("--repo", required=True, help="the Space, 'owner/name'")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the Space private")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the Space public")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN, else the saved token)")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME[=VALUE]",
                        help="set a Space secret (repeatable); a bare NAME takes $NAME, e.g. --secret HF_TOKEN")
    parser.add_argument("--variable", action="append", default=[], metavar="NAME=VALUE",
                        help="set a public Space variable (repeatable), e.g. FLAGLOOP_DATASET_REPO=me/flags")
    parser.add_argument("--dataset-repo", metavar="OWNER/NAME",
                        help="the feedback dataset repo: sets the variable FLAGLOOP_DATASET_REPO")
    parser.add_argument("--registry-repo", metavar="OWNER/NAME",
                        help="the model registry repo the Space follows: sets the variable FLAGLOOP_REGISTRY_REPO")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the Space's files locally and list them; nothing is sent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="flagloop: %(message)s")

    try:
        repo = check_repo_id(args.repo)
        secrets = parse_assignments(args.secret, "secret")
        variables = parse_assignments(args.variable, "variable")
        for name, repo_id in (("FLAGLOOP_DATASET_REPO", args.dataset_repo), ("FLAGLOOP_REGISTRY_REPO", args.registry_repo)):
            if repo_id is not None:
                variables[name] = check_repo_id(repo_id, what=name)
        if args.dry_run:
            check_setting_names([*secrets, *variables])
            check_public(variables)
            return dry_run(repo, secrets, variables)
        from huggingface_hub import get_token

        from feedback.sync import install_http_timeout

        token = args.token or get_token()
        install_http_timeout()  # a Hub that never answers fails the deploy instead of holding it forever
        result = deploy(repo, token=token, private=args.private, secrets=secrets, variables=variables,
                        message=args.message)
    except DeployError as err:
        print(f"flagloop: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - every Hub or network failure ends as one line and exit 2
        from huggingface_hub import constants

        log.debug("deploy failed", exc_info=True)
        print(f"flagloop: deploy to Space {args.repo} failed: {describe_error(err, args.repo, constants.ENDPOINT)}",
              file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def dry_run(repo: str, secrets: dict[str, str], variables: dict[str, str]) -> int:
    """Build the Space's files in a temporary folder and print what a deploy would send."""
    with tempfile.TemporaryDirectory(prefix="flagloop-space-") as tmp:
        folder = Path(tmp)
        shipped = build_space_folder(folder, repo)
        print(f"Space {repo} would get {len(shipped)} files (dry run, nothing sent):")
        for rel in shipped:
            print(f"  {rel}  ({(folder / rel).stat().st_size} bytes)")
        print("requirements.txt:\n  " + "\n  ".join((folder / "requirements.txt").read_text().split()))
        print("README.md front matter:\n  " + "\n  ".join(front_matter(repo).splitlines()))
    for name in secrets:
        print(f"secret {name} would be set (value hidden)")
    for name, value in variables.items():
        print(f"variable {name}={value} would be set")
    return 0
