"""Follow the model registry (a local folder, or a Hub model repo): load its new current version, swap it in between answers.

    >>> source = registry_source(settings)                    # HubSource with registry_repo set, else LocalSource
    >>> served, seen, problem = initial_model(settings, source) # its current version, else the configured model
    >>> app = App(settings, served, store)
    >>> watch = RegistryWatch(source, app.swap_model, every=settings.registry_poll_seconds, seen=seen).start()
    >>> watch.problem        # None, or the one line the page's model line shows (e.g. the Hub is down)
    >>> watch.stop()

Every `every` seconds the watch asks the source for its current version: the local `current.json`,
or, on the Hub, one small HEAD request for `current.json` (its ETag unchanged: nothing else is asked).
When it names another version (a publish, or a rollback to an older one), the new GGUF is loaded in
the watch's thread, with no lock held, so chats go on meanwhile on the old model (for a while both
are in memory); then `swap` puts it in the generator under the generator's lock: an answer in flight
ends on the old model, the next one comes from the new one and its flags name the new version.

A Hub version is downloaded through the HF cache (`hf_hub_download(repo, "versions/vN/<file>",
revision="vN")`) and its sha256 checked against its version.json before it loads: a file whose bytes
differ is never served (a cached copy that differs is downloaded once more first). When the Hub is
down or a download breaks off, the app keeps serving what it serves, says so once in the log and on
the page's model line, and tries again at the next poll. A version that cannot be served for good
(its file differs from its record, llama.cpp cannot load it) is logged and skipped until `current`
names something else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from retrain.registry import HubRegistry, LocalRegistry, NotTaggedYet, RegistryError
from schemas.registry import ModelVersion
from schemas.settings import Settings
from space.model import ChecksumMismatch, ModelError, ModelFile, ServedModel, load_file, load_model

log = logging.getLogger(__name__)


UNTAGGED_POLLS = 3  # a current version still without its tag after this many polls: said as a problem


class SourceUnavailable(RegistryError):
    """The registry could not be read or its file fetched now (the Hub is down): try again later."""


class NotYet(SourceUnavailable):
    """The version is not complete on the Hub yet (its tag is coming): try again at the next poll, nothing to say."""


class LocalSource:
    """The local registry folder (`registry_dir`)."""

    def __init__(self, settings: Settings, registry: LocalRegistry):
        self.settings = settings
        self.registry = registry
        self.where = f"the model registry {registry.root}"

    def current(self) -> ModelVersion | None:
        return self.registry.current()

    def cached_current(self) -> ModelVersion | None:
        return None  # a local folder is read or not: there is nothing older to fall back on

    def load(self, version: ModelVersion) -> ServedModel:
        """Load one version; its identity says source "local", the version's file and name."""
        return load_file(ModelFile(self.registry.path_of(version), "local"), self.settings, version=version.version,
                         expect_sha256=version.sha256)


class HubSource:
    """A registry in a Hub model repo (`registry_repo`), read through the HF cache."""

    def __init__(self, settings: Settings, hub: HubRegistry):
        self.settings = settings
        self.hub = hub
        self.where = f"the Hub model registry {hub.repo_id}"
        self._etag: str | None = None  # of current.json when last read
        self._version: ModelVersion | None = None  # what it named
        self._untagged = 0  # loads in a row that found the version without its tag

    def current(self) -> ModelVersion | None:
        """The version current.json on the Hub names: one HEAD request while it is unchanged."""
        try:
            pointer = self.hub.pointer()
            if pointer is None:
                return None
            if pointer[0] != self._etag:
                self._version, self._etag = self.hub.current(), pointer[0]
        except RegistryError as err:
            raise SourceUnavailable(str(err)) from err
        return self._version

    def cached_current(self) -> ModelVersion | None:
        """The current version as the HF cache last saw it (start-up with the Hub down)."""
        try:
            return self.hub.cached_current()
        except RegistryError:
            return None

    def load(self, version: ModelVersion) -> ServedModel:
        """Download (or take from the cache) one version's GGUF at its tag, check its sha256, load it."""
        for force in (False, True):
            started = time.monotonic()
            try:
                path, commit = self.hub.download(version, force=force)
            except NotTaggedYet as err:
                # Caught between a publish's commit and its tag: a later poll takes it.
                self._untagged += 1
                if self._untagged < UNTAGGED_POLLS:
                    log.info("%s is not tagged yet (a publish under way): the next poll tries again", version.version)
                    raise NotYet(str(err)) from err
                raise SourceUnavailable(str(err)) from err
            except RegistryError as err:
                raise SourceUnavailable(str(err)) from err
            self._untagged = 0
            log.info("fetched %s of %s (%.0f MB, commit %s) in %.1f s", version.version, self.hub.repo_id,
                     version.bytes / 1e6, commit[:12], time.monotonic() - started)
            try:
                return load_file(ModelFile(path, "hub", repo=self.hub.repo_id, revision=commit), self.settings,
                                 version=version.version, expect_sha256=version.sha256)
            except ChecksumMismatch:
                if force:
                    raise
                log.warning("the cached copy of %s differs from its version.json: downloading it again", version.version)
        raise AssertionError("unreachable")


def registry_source(settings: Settings, token: str | None = None) -> LocalSource | HubSource:
    """What the app follows: the Hub registry when `registry_repo` is set, else the local folder."""
    if settings.registry_repo:
        # No retries of its own: the next poll is the retry, and a Hub that is down is said once, not per attempt.
        return HubSource(settings, HubRegistry(settings.registry_repo, token=token, retry_waits=()))
    return LocalSource(settings, LocalRegistry(settings.registry_dir))


def initial_model(settings: Settings, source) -> tuple[ServedModel, tuple[str, str] | None, str | None]:
    """What to serve at start-up: the source's current version, else the configured model (ModelError if neither loads).

    Also returns the registry version acted on, (version, sha256), so the watch does not load it again
    (None: the watch should try), and the problem to show on the page (None when there is none).
    """
    problem = None
    try:
        current = source.current()
    except RegistryError as err:
        problem = f"{source.where} cannot be read ({err})"
        log.error("%s", problem)
        current = source.cached_current()
        if current is not None:
            log.info("serving %s as the HF cache last saw it; following the registry again once it answers",
                     current.version)
    if current is None:
        return load_model(settings), None, problem
    try:
        return source.load(current), (current.version, current.sha256), problem
    except SourceUnavailable as err:
        problem = f"registry version {current.version} cannot be fetched now from {source.where} ({err})"
        log.error("%s: serving the configured model until it can", problem)
        return load_model(settings), None, problem
    except (ModelError, RegistryError, OSError) as err:
        problem = f"registry version {current.version} cannot be served ({err})"
        log.error("%s: serving the configured model", problem)
        return load_model(settings), (current.version, current.sha256), problem


class RegistryWatch:
    """A thread that polls the registry and swaps its new current version in (see the module doc)."""

    def __init__(self, source, swap: Callable[[ServedModel], None], every: float,
                 seen: tuple[str, str] | None = None, problem: str | None = None):
        self.source = source
        self.swap = swap
        self.every = every
        self.seen = seen  # (version, sha256) last acted on, loaded or refused for good
        self.problem = problem  # the one line the page shows while something is wrong; None when all is well
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RegistryWatch":
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        log.info("watching %s every %g s", self.source.where, self.every)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling; a load under way is finished and thrown away, a swap waits for the answer in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad poll
                log.exception("checking %s failed", self.source.where)

    def _trouble(self, text: str) -> None:
        """Say what is wrong once (not at every poll): in the log, and on the page's model line."""
        if text != self.problem:
            log.error("%s; still serving the same model, trying again in %g s", text, self.every)
        self.problem = text

    def poll(self) -> str | None:
        """Check the registry once; return the version swapped in, if any."""
        try:
            current = self.source.current()
        except RegistryError as err:
            self._trouble(f"{self.source.where} cannot be read ({err})")
            return None
        if current is None or (current.version, current.sha256) == self.seen:
            self._settled()
            return None
        log.info("the registry's current version is now %s: loading %s", current.version, current.file)
        try:
            served = self.source.load(current)
        except NotYet:  # not seen, nothing wrong: the next poll tries again
            return None
        except SourceUnavailable as err:  # not seen: the next poll tries again
            self._trouble(f"registry version {current.version} cannot be fetched now from {self.source.where} ({err})")
            return None
        except (ModelError, RegistryError, OSError) as err:
            self.seen = (current.version, current.sha256)  # for good: skipped until current names another
            self._trouble(f"registry version {current.version} cannot be served ({err}): skipped")
            return None
        self.seen = (current.version, current.sha256)
        if self._stop.is_set():
            served.llama.close()
            return None
        log.info("%s is loaded: it serves from the next answer on", current.version)
        self.swap(served)  # waits for the answer in flight, if any
        self.problem = None
        log.info("now serving %s (%s, sha256 %s…)", current.version, served.identity.quant, served.identity.sha256[:12])
        return current.version

    def _settled(self) -> None:
        """Nothing new and nothing failing: a reading problem is over (a refused version stays said)."""
        if self.problem is not None and "cannot be served" not in self.problem:
            log.info("%s answers again", self.source.where)
            self.problem = None
