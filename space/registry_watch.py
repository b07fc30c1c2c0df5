"""Follow the model registry: load its new current version in the background, swap it in between answers.

    >>> registry = LocalRegistry(settings.registry_dir)
    >>> served, seen = initial_model(settings, registry)      # the registry's current version, else the configured model
    >>> app = App(settings, served, store)
    >>> watch = RegistryWatch(registry, lambda v: load_version(settings, registry, v), app.swap_model,
    ...                       every=settings.registry_poll_seconds, seen=seen).start()
    >>> watch.stop()

Every `every` seconds the watch reads `current.json`. When it names another version (a publish, or a
rollback to an older one), the new GGUF is loaded in the watch's thread, with no lock held, so chats
go on meanwhile on the old model (for a while both are in memory); then `swap` puts it in the
generator under the generator's lock: an answer in flight ends on the old model, the next one comes
from the new one and its flags name the new version. A version that does not load (missing, corrupt,
changed since it was published) is logged and skipped: the app keeps serving what it serves, and
tries again only when `current` names something else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from retrain.registry import LocalRegistry, RegistryError
from schemas.registry import ModelVersion
from schemas.settings import Settings
from space.model import ModelError, ModelFile, ServedModel, load_file, load_model

log = logging.getLogger(__name__)


def load_version(settings: Settings, registry: LocalRegistry, version: ModelVersion) -> ServedModel:
    """Load one registry version; its identity says source "local", the version's file and name."""
    return load_file(ModelFile(registry.path_of(version), "local"), settings, version=version.version,
                     expect_sha256=version.sha256)


def initial_model(settings: Settings, registry: LocalRegistry) -> tuple[ServedModel, tuple[str, str] | None]:
    """What to serve at start-up: the registry's current version, else the configured model (ModelError if neither loads).

    Also returns the registry version seen, (version, sha256), so the watch does not load it again.
    """
    try:
        current = registry.current()
    except RegistryError as err:
        log.error("the model registry %s cannot be read (%s): serving the configured model", registry.root, err)
        current = None
    if current is None:
        return load_model(settings), None
    try:
        return load_version(settings, registry, current), (current.version, current.sha256)
    except (ModelError, RegistryError, OSError) as err:
        log.error("cannot serve the registry's current version %s (%s): serving the configured model", current.version, err)
        return load_model(settings), (current.version, current.sha256)


class RegistryWatch:
    """A thread that polls the registry and swaps its new current version in (see the module doc)."""

    def __init__(self, registry: LocalRegistry, load: Callable[[ModelVersion], ServedModel],
                 swap: Callable[[ServedModel], None], every: float, seen: tuple[str, str] | None = None):
        self.registry = registry
        self.load = load
        self.swap = swap
        self.every = every
        self.seen = seen  # (version, sha256) last acted on, loaded or not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    def start(self) -> "RegistryWatch":
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        log.info("watching the model registry %s every %g s", self.registry.root, self.every)
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
                log.exception("checking the model registry %s failed", self.registry.root)

    def poll(self) -> str | None:
        """Check the registry once; return the version swapped in, if any."""
        try:
            current = self.registry.current()
        except RegistryError as err:
            if str(err) != self._last_error:  # once per problem, not at every poll
                log.error("cannot read the model registry: %s; still serving the same model", err)
                self._last_error = str(err)
            return None
        self._last_error = None
        if current is None or (current.version, current.sha256) == self.seen:
            return None
        self.seen = (current.version, current.sha256)
        log.info("the registry's current version is now %s: loading %s", current.version, current.file)
        try:
            served = self.load(current)
        except (ModelError, RegistryError, OSError) as err:
            log.error("registry version %s cannot be served (%s): skipped, still serving the same model",
                      current.version, err)
            return None
        if self._stop.is_set():
            served.llama.close()
            return None
        log.info("%s is loaded: it serves from the next answer on", current.version)
        self.swap(served)  # waits for the answer in flight, if any
        log.info("now serving %s (%s, sha256 %s…)", current.version, served.identity.quant, served.identity.sha256[:12])
        return current.version
