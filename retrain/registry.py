"""The model registry: the published GGUF versions, and the `current` pointer the app serves.

    >>> registry = LocalRegistry(Path("data/registry"))
    >>> registry.publish(Path("data/runs/r1/export/model.gguf"), base_sha256="9f1c…", run_id="r1").version
    'v3'
    >>> registry.current().version, registry.current_path()
    ('v3', PosixPath('data/registry/versions/v3/model.gguf'))
    >>> registry.rollback("v2")   # the app serves v2 again at its next poll

Local layout (`LocalRegistry`)::

    <root>/versions/v1/<file>.gguf      the GGUF, byte for byte as published
    <root>/versions/v1/version.json     its ModelVersion (written last: a folder without it is not a version)
    <root>/versions/v1/manifest.json    the RunManifest of the run that made it, when there is one
    <root>/current.json                 {"version": "v1"}: the version the app serves

A version is put together in a hidden folder (`versions/.v3.tmp-…`), its files fsynced, then renamed to
`v3` in one step, and only then is `current.json` replaced (write, fsync, rename, fsync the folder). So a
failure, or a SIGKILL, at any point leaves the previous version current and its file whole; readers list
only folders named `vN` holding a `version.json`. Numbers are never reused: a half-written folder, or
the marker a failed publish leaves (`versions/.v3.failed`), still counts. One publish at a time
(an flock on `<root>/.publish.lock`; the kernel drops it when the process dies).

Hub layout (`HubRegistry`): the same paths in a private Hub model repo, plus the model card
(README.md). A publish is ONE commit (the GGUF, version.json, manifest.json, current.json, README.md)
followed by a tag `vN` on that commit, so `hf_hub_download(repo, "versions/v3/model.gguf", revision="v3")`
gets that version's bytes forever. A rollback is a commit rewriting current.json and the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from feedback.files import exclusive_lock, fsync_dir, write_atomic
from retrain.gguf_file import quant_name
from retrain.model_card import model_card
from schemas.registry import ModelVersion
from schemas.run import RunManifest

log = logging.getLogger(__name__)

VERSION = re.compile(r"^v(\d+)$")
NUMBERED = re.compile(r"^\.?v(\d+)(?:\..*)?$")  # v3, and the hidden .v3.tmp-… / .v3.failed that also hold 3
CURRENT = "current.json"
VERSION_FILE = "version.json"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".publish.lock"
COPY_CHUNK = 8 << 20
RETRY_WAITS_S = (1.0, 2.0, 4.0)  # waits before the 2nd, 3rd and 4th attempt of a Hub call, as the feedback sync's


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what is wrong and what to do."""


class NotTaggedYet(RegistryError):
    """A version on the Hub without its tag (yet): a publish between its commit and its tag."""


class PublishError(RegistryError):
    """A version was not published (or not everywhere it should be); the message says where it is."""


# -- small file-system helpers ---------------------------------------------------------------------


def copy_and_hash(src: Path, dst: Path) -> tuple[str, int]:
    """Copy `src` to `dst` (fsynced); return the sha256 and size of the bytes copied, read once."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(COPY_CHUNK):
            digest.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


# -- what a GGUF is --------------------------------------------------------------------------------

def gguf_quant(path: Path) -> str:
    """The quantization of a GGUF (Q4_1, Q8_0, F16, …), named as the app names it on FlagRecords."""
    return quant_name(path, RegistryError)


# -- the local registry ----------------------------------------------------------------------------


class LocalRegistry:
    """Published versions in a local folder, and the `current` pointer the app polls (see the module doc)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # -- reading ---------------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first."""
        return [self._read(folder) for _, folder in self._complete()]

    def get(self, version: str) -> ModelVersion:
        """One version's record; RegistryError naming the known versions if there is no such version."""
        if not isinstance(version, str) or not VERSION.match(version) or not (self.versions_dir / version / VERSION_FILE).is_file():
            known = ", ".join(f.name for _, f in self._complete()) or "none yet"
            raise RegistryError(f"no version {version!r} in the registry {self.root}: the known versions are {known}")
        return self._read(self.versions_dir / version)

    def path_of(self, version: ModelVersion | str) -> Path:
        """The GGUF file of a version."""
        record = self.get(version) if isinstance(version, str) else version
        return self.versions_dir / record.version / record.file

    def current(self) -> ModelVersion | None:
        """The version the app should serve; None when nothing was published yet."""
        pointer = self.root / CURRENT
        try:
            data = json.loads(pointer.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as err:
            raise RegistryError(f"{pointer} is not valid JSON ({err}): run a rollback to rewrite it") from err
        version = data.get("version") if isinstance(data, dict) else None
        try:
            return self.get(version)
        except RegistryError as err:
            raise RegistryError(f"{pointer} points at {version!r}, which is not a complete version: {err}") from None

    def current_path(self) -> Path | None:
        """The GGUF file of the current version; None when nothing was published yet."""
        current = self.current()
        return None if current is None else self.path_of(current)

    # -- writing ---------------------------------------------------------------------------------

    def publish(self, gguf: Path | str, *, manifest: RunManifest | None = None, min_number: int = 1,
                **fields) -> ModelVersion:
        """Add `gguf` as the next version (numbered `min_number` at least) and make it current; return its record.

        `fields` are ModelVersion's other fields (base_sha256 is required; run_id, dataset_revision,
        metrics, gate; quant when the GGUF header should not decide it). The copy's sha256 and size
        are computed from the bytes copied. A failure before the version's folder is renamed into
        place leaves nothing but its number taken; one after it (writing current.json) leaves the
        version complete but not current: `rollback(version)` makes it current.
        """
        gguf = Path(gguf)
        if not gguf.is_file():
            raise PublishError(f"cannot publish {str(gguf)!r}: no such file; export a GGUF first")
        quant = fields.pop("quant", None) or gguf_quant(gguf)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with self._publish_lock():
            self._clear_leftovers()
            number = max(self._next_number(), min_number)
            name = f"v{number}"
            tmp = self.versions_dir / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
            tmp.mkdir()
            try:
                sha256, size = copy_and_hash(gguf, tmp / gguf.name)
                record = ModelVersion(version=name, file=gguf.name, sha256=sha256, bytes=size, quant=quant, **fields)
                if manifest is not None:
                    write_atomic(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
                write_atomic(tmp / VERSION_FILE, record.model_dump_json(indent=2).encode())  # last: it completes the folder
                os.rename(tmp, self.versions_dir / name)
                fsync_dir(self.versions_dir)
            except BaseException:
                self._mark_failed(tmp, number)
                raise
            self._point_at(name)
        log.info("published %s (%s, %s, sha256 %s…) in %s", name, gguf.name, quant, sha256[:12], self.root)
        return record

    def rollback(self, version: str) -> ModelVersion:
        """Make an older (or any other) version current again; return its record."""
        record = self.get(version)
        if not self.path_of(record).is_file():
            raise RegistryError(f"version {version} in {self.root} lacks its file {record.file}: it cannot be served")
        with self._publish_lock():
            self._point_at(record.version)
        log.info("the registry %s now serves %s", self.root, record.version)
        return record

    # -- inside ----------------------------------------------------------------------------------

    def _complete(self) -> list[tuple[int, Path]]:
        """(number, folder) of every complete version folder, by number."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for folder in self.versions_dir.iterdir():
            m = VERSION.match(folder.name)
            if m and (folder / VERSION_FILE).is_file():
                found.append((int(m.group(1)), folder))
        return sorted(found)

    def _read(self, folder: Path) -> ModelVersion:
        path = folder / VERSION_FILE
        try:
            return ModelVersion.model_validate_json(path.read_bytes())
        except ValueError as err:
            raise RegistryError(f"{path} is not a valid ModelVersion ({err})") from err

    def _next_number(self) -> int:
        """One more than any number the versions folder holds, complete or not."""
        numbers = [int(m.group(1)) for p in self.versions_dir.iterdir() if (m := NUMBERED.match(p.name))]
        return max(numbers, default=0) + 1

    def _point_at(self, name: str) -> None:
        write_atomic(self.root / CURRENT, json.dumps({"version": name}).encode() + b"\n")

    def _mark_failed(self, tmp: Path, number: int) -> None:
        """Free a failed publish's bytes but keep its number taken (an empty `.vN.failed` folder)."""
        try:
            failed = self.versions_dir / f".v{number}.failed"
            shutil.rmtree(tmp, ignore_errors=True)
            failed.mkdir(exist_ok=True)
        except OSError:  # the original error matters more; the next publish clears what is left
            log.exception("could not clear the failed publish in %s", tmp)

    def _clear_leftovers(self) -> None:
        """Turn the folders of killed publishes (lock held: none is running) into `.vN.failed` markers."""
        for path in self.versions_dir.iterdir():
            m = NUMBERED.match(path.name)
            if m and ".tmp-" in path.name:
                log.warning("removing %s, left by a publish that was killed", path)
                self._mark_failed(path, int(m.group(1)))

    def _publish_lock(self):
        return exclusive_lock(self.root / LOCK_FILE)


# -- the Hub registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRelease:
    """A version on the Hub: the commit that published it (or last re-pointed `current` at it) and its tag."""

    repo: str
    version: ModelVersion
    commit: str
    tag: str

    @property
    def url(self) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{self.repo}/tree/{self.tag}"


class HubRegistry:
    """The registry in a Hub model repo: one commit and one tag per version (see the module doc).

        >>> hub = HubRegistry("me/flagloop-model")
        >>> hub.publish(Path("versions/v3/model.gguf"), local.get("v3"), manifest=manifest).commit
        '3f2a9c1…'
        >>> hub.current().version
        'v3'

    Each call retries what failed for a passing reason (5xx, 429, a time-out, a dropped connection)
    after 1, 2 and 4 s, like the feedback sync; then, or at once for any other error, it raises
    PublishError with one line saying why. A version is reported published only once its commit
    returned.
    """

    def __init__(self, repo_id: str, token: str | None = None, *, base_model: str | None = None,
                 retry_waits: tuple[float, ...] | None = None, sleep: Callable[[float], None] | None = None):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.api = HfApi(token=token, library_name="flagloop")
        self.base_model = base_model  # the card's `base_model` (a Hub model id), when known
        self.retry_waits = RETRY_WAITS_S if retry_waits is None else tuple(retry_waits)
        self._sleep = sleep or time.sleep

    # -- reading ---------------------------------------------------------------------------------

    def current(self) -> ModelVersion | None:
        """The version current.json on the Hub names; None when the repo or the pointer does not exist yet."""
        path = self._download(CURRENT)
        if path is None:
            return None
        # .../snapshots/<commit>/current.json: read the version at the same commit.
        return self.get(self._pointer_name(path), revision=path.parent.name)

    def get(self, version: str, revision: str = "main") -> ModelVersion:
        """One version's record on the Hub; RegistryError naming the known versions if there is none."""
        found = self._find(version, revision)
        if found is None:
            known = ", ".join(self._version_names()) or "none yet"
            raise RegistryError(f"no version {version!r} in the Hub repo {self.repo_id}: the known versions are {known}")
        return found

    def versions(self) -> list[ModelVersion]:
        """Every version on the Hub's main branch, oldest first."""
        return [self.get(name) for name in self._version_names()]

    def next_number(self) -> int:
        """One more than the largest N of the versions on the Hub (1 when none); creates the repo when missing."""
        self._retrying("create the repo", self._ensure_repo)
        return max((int(name[1:]) for name in self._version_names()), default=0) + 1

    # -- following it (the app) ------------------------------------------------------------------

    def pointer(self) -> tuple[str, str] | None:
        """(ETag, commit) of current.json on main, from one small HEAD request; None when nothing is published."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        url = hf_hub_url(self.repo_id, CURRENT, endpoint=self.api.endpoint)

        def head():
            try:
                meta = self.api.get_hf_file_metadata(url=url)
            except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
                return None
            return meta.etag, meta.commit_hash

        return self._retrying(f"read {CURRENT}", head, error=RegistryError)

    def cached_current(self) -> ModelVersion | None:
        """The current version as the local HF cache last saw it (`current` read it), without a request."""
        from huggingface_hub import try_to_load_from_cache

        def cached(path_in_repo: str, revision: str) -> Path | None:
            found = try_to_load_from_cache(self.repo_id, path_in_repo, revision=revision)
            return Path(found) if isinstance(found, str) else None

        pointer = cached(CURRENT, "main")
        if pointer is None:
            return None
        record = cached(f"versions/{self._pointer_name(pointer)}/{VERSION_FILE}", pointer.parent.name)
        try:
            return None if record is None else ModelVersion.model_validate_json(record.read_bytes())
        except ValueError as err:
            raise RegistryError(f"the cached {record} is not a ModelVersion ({err})") from err

    def download(self, version: ModelVersion, force: bool = False) -> tuple[Path, str]:
        """A version's GGUF through the HF cache, at its tag: (local path, commit). `force`: download it again.

        Offline (the Hub does not answer) a file already in the cache is returned as it is.
        """
        from huggingface_hub.errors import RevisionNotFoundError

        name = version.version
        path_in_repo = f"versions/{name}/{version.file}"
        try:
            path = Path(self._retrying(
                f"download {path_in_repo}",
                lambda: self.api.hf_hub_download(self.repo_id, path_in_repo, revision=name, force_download=force),
                error=RegistryError,
            ))
        except RegistryError as err:
            if isinstance(err.__cause__, RevisionNotFoundError):
                raise NotTaggedYet(f"{name} of the Hub repo {self.repo_id} has no tag {name} yet: a publish still "
                                   "under way (its tag comes right after its commit), or a broken registry") from err
            raise
        # .../snapshots/<commit>/versions/vN/<file>: the commit pins the bytes.
        return path, path.parents[len(Path(path_in_repo).parts) - 1].name

    def _pointer_name(self, pointer: Path) -> str:
        """The version a current.json file names; RegistryError when it names none."""
        try:
            name = json.loads(pointer.read_bytes())["version"]
        except (ValueError, KeyError, TypeError) as err:
            raise RegistryError(f"{CURRENT} of the Hub repo {self.repo_id} is not a version pointer ({err})") from err
        if not isinstance(name, str) or not VERSION.match(name):
            raise RegistryError(f"{CURRENT} of the Hub repo {self.repo_id} names {name!r}, not a version: roll back "
                                "to a complete version")
        return name

    def _find(self, version: str, revision: str = "main") -> ModelVersion | None:
        """A version's record at a revision; None when it is not there."""
        if not VERSION.match(version or ""):
            return None
        path = self._download(f"versions/{version}/{VERSION_FILE}", revision)
        return None if path is None else ModelVersion.model_validate_json(path.read_bytes())

    def _download(self, path_in_repo: str, revision: str = "main") -> Path | None:
        """A file of the repo, through the local cache; None when the repo, revision or file does not exist."""
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return Path(self._retrying(
                f"read {path_in_repo}",
                lambda: self.api.hf_hub_download(self.repo_id, path_in_repo, revision=revision),
                error=RegistryError,
            ))
        except RegistryError as err:
            if isinstance(err.__cause__, (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
                return None
            raise

    def _version_names(self) -> list[str]:
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

        try:
            entries = self._retrying(
                "list versions", lambda: list(self.api.list_repo_tree(self.repo_id, "versions")), error=RegistryError
            )
        except RegistryError as err:
            if isinstance(err.__cause__, (RemoteEntryNotFoundError, RepositoryNotFoundError)):
                return []
            raise
        names = [e.path.split("/")[-1] for e in entries]
        return sorted((n for n in names if VERSION.match(n)), key=lambda n: int(n[1:]))

    # -- writing ---------------------------------------------------------------------------------

    def publish(self, gguf: Path | str, version: ModelVersion, manifest: RunManifest | None = None) -> HubRelease:
        """Commit `gguf` as `version` (files, current.json, card) in one commit, then tag it `vN`.

        The same version published again (a retry, a resumed run) changes nothing and tags the same
        commit; another file under the same version name is refused.
        """
        from huggingface_hub import CommitOperationAdd

        gguf, name = Path(gguf), version.version
        self._retrying("create the repo", self._ensure_repo)
        self._check_free(name, version)
        card = model_card(self.repo_id, version, manifest, base_model=self.base_model)
        files = {
            f"versions/{name}/{version.file}": str(gguf),
            f"versions/{name}/{VERSION_FILE}": version.model_dump_json(indent=2).encode(),
            CURRENT: json.dumps({"version": name}).encode() + b"\n",
            "README.md": card.encode(),
        }
        if manifest is not None:
            files[f"versions/{name}/{MANIFEST_FILE}"] = manifest.model_dump_json(indent=2).encode()
        # Fresh operations at each attempt: huggingface_hub refuses an operation it already committed.
        # A retry after a commit whose answer was lost finds every file there, and makes no second commit.
        info = self._retrying(
            f"commit {name}",
            lambda: self.api.create_commit(
                self.repo_id, [CommitOperationAdd(path, content) for path, content in files.items()],
                commit_message=f"Publish {name}",
                commit_description=f"{version.file} ({version.quant}, sha256 {version.sha256}), "
                                   f"run {version.run_id or '-'}; published by flagloop from {socket.gethostname()}.",
            ),
        )
        commit = info.oid
        self._retrying(f"tag {name}", lambda: self._tag(name, commit, version))
        log.info("published %s to the Hub repo %s (commit %s, tag %s)", name, self.repo_id, commit[:12], name)
        return HubRelease(self.repo_id, version, commit, name)

    def rollback(self, version: str) -> HubRelease:
        """Point current.json (and the card) at an existing version, in one commit."""
        from huggingface_hub import CommitOperationAdd

        record = self.get(version)
        manifest = self._manifest_of(version)
        card = model_card(self.repo_id, record, manifest, base_model=self.base_model)
        files = {CURRENT: json.dumps({"version": version}).encode() + b"\n", "README.md": card.encode()}
        info = self._retrying(
            f"roll back to {version}",
            lambda: self.api.create_commit(
                self.repo_id, [CommitOperationAdd(path, content) for path, content in files.items()],
                commit_message=f"Serve {version} (rollback)",
            ),
        )
        log.info("the Hub repo %s now serves %s (commit %s)", self.repo_id, version, info.oid[:12])
        return HubRelease(self.repo_id, record, info.oid, version)

    # -- inside ----------------------------------------------------------------------------------

    def _ensure_repo(self) -> None:
        """Create the repo (private) if it is missing; a token that may write but not create still works."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            self.api.repo_info(self.repo_id, repo_type="model")
        except RepositoryNotFoundError:
            self.api.create_repo(self.repo_id, repo_type="model", private=True, exist_ok=True)
            log.info("created the private model repo %s", self.repo_id)

    def free_for(self, version: ModelVersion) -> bool:
        """Whether `version`'s name is unused on the Hub, or used by this very file."""
        there = self._find(version.version)
        return there is None or there.sha256 == version.sha256

    def _check_free(self, name: str, version: ModelVersion) -> None:
        """Refuse to publish over another file of the same version name (registries out of step)."""
        there = self._find(name)
        if there is not None and there.sha256 != version.sha256:
            raise PublishError(
                f"the Hub repo {self.repo_id} already has {name} with another file ({there.file}, sha256 "
                f"{there.sha256[:12]}…, not {version.sha256[:12]}…): the local registry and the Hub disagree; "
                "publish from the registry that made that version, or use another repo"
            )

    def _tag(self, name: str, commit: str, version: ModelVersion) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self.api.create_tag(self.repo_id, tag=name, revision=commit, tag_message=f"flagloop {name}")
        except HfHubHTTPError as err:
            if getattr(err.response, "status_code", None) != 409:
                raise
            # The tag exists: fine when it names this version (a retry after a lost answer).
            tagged = self._find(name, revision=name)
            if tagged is None or tagged.sha256 != version.sha256:
                raise PublishError(
                    f"the tag {name} of {self.repo_id} already names another commit, without this file "
                    f"(sha256 {version.sha256[:12]}…) as {name}: "
                    "delete that tag on the Hub, or publish to another repo"
                ) from err

    def _manifest_of(self, version: str) -> RunManifest | None:
        path = self._download(f"versions/{version}/{MANIFEST_FILE}")
        return None if path is None else RunManifest.model_validate_json(path.read_bytes())

    def _retrying(self, what: str, call: Callable, error: type[RegistryError] = PublishError):
        """`call()`, tried again after each of retry_waits while it fails for a passing reason."""
        from feedback.sync import HubCallError, retrying

        try:
            return retrying(call, self._describe, what=f"{what} on {self.repo_id}", waits=self.retry_waits,
                            sleep=self._sleep, passthrough=(RegistryError,))
        except HubCallError as err:
            raise error(f"could not {what} on the Hub repo {self.repo_id}: {err}") from err.__cause__

    def _describe(self, err: BaseException) -> str:
        from huggingface_hub import constants
        from huggingface_hub.errors import RepositoryNotFoundError

        from feedback.sync import HTTP_TIMEOUT_S, describe_error

        if isinstance(err, RepositoryNotFoundError):
            return (f"model repo {self.repo_id} not found or not readable ({getattr(err.response, 'status_code', '?')}): "
                    "check FLAGLOOP_REGISTRY_REPO, and that the token (FLAGLOOP_HUB_TOKEN or HF_TOKEN) may write to it")
        text = describe_error(err, self.repo_id, constants.ENDPOINT, HTTP_TIMEOUT_S)
        token = self.api.token if isinstance(self.api.token, str) else None
        return text.replace(token, "hf_***") if token else text
