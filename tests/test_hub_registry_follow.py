"""The app follows a model registry on the Hub: the current version served, polled cheaply, never a wrong file.

Real huggingface_hub client and HF cache, the Hub-protocol server on 127.0.0.1, real llama.cpp loads.
The versions are published with retrain.registry.HubRegistry, as the training host publishes them:
v1 is the embedded GGUF (Q4_1), v2 the same model re-quantized to Q8_0 (another file, another sha256).
The app's own threads are not needed here: `RegistryWatch.poll` is called as its thread calls it,
and `swap` records what the generator would get (tests/test_two_hosts.py runs the real app).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from retrain.registry import HubRegistry
from schemas.registry import ModelVersion
from schemas.settings import Settings
from space.model import embedded_model_path, sha256_of
from space.registry_watch import HubSource, RegistryWatch, initial_model, registry_source
from tests.test_app_swaps_model import requantize

REPO = "flagloop-tester/served-model"


@pytest.fixture(scope="module")
def q8(tmp_path_factory) -> Path:
    return requantize(embedded_model_path(), tmp_path_factory.mktemp("q8") / "SmolLM2-135M-Instruct.Q8_0.gguf")


@pytest.fixture
def hub(hub_server, hub_client_waits):
    yield hub_server
    set_client_factory(default_client_factory)


def settings_for(tmp_path: Path) -> Settings:
    return Settings(feedback_dir=tmp_path / "feedback", registry_dir=tmp_path / "registry", registry_repo=REPO,
                    n_threads=2, n_ctx=512)


def publish(path: Path, name: str, sha256: str | None = None):
    """Publish `path` as version `name` on the Hub registry (the sha256 its record names: the file's, unless given)."""
    version = ModelVersion(version=name, file=path.name, sha256=sha256 or sha256_of(path), bytes=path.stat().st_size,
                           quant="Q8_0" if "Q8_0" in path.name else "Q4_1", base_sha256="0" * 64, run_id=f"run-{name}")
    return HubRegistry(REPO).publish(path, version)


class Swaps(list):
    """The models `swap` was given, in order (each closed: only its identity is kept)."""

    def __call__(self, served) -> None:
        self.append(served.identity)
        served.llama.close()


def watching_v1(tmp_path: Path) -> tuple[RegistryWatch, Swaps]:
    """The app's watch as start-up leaves it, serving v1 from the Hub, and the swaps it makes from then on."""
    settings = settings_for(tmp_path)
    source = registry_source(settings)
    served, seen, _ = initial_model(settings, source)
    served.llama.close()
    swaps = Swaps()
    return RegistryWatch(source, swaps, every=1.0, seen=seen), swaps


def requests_since(hub, n: int) -> list[tuple[str, str]]:
    return [(r.method, r.path.split("?")[0]) for r in hub.requests[n:]]


def test_the_app_serves_the_hubs_current_version_and_follows_a_publish_and_a_rollback(hub, tmp_path, q8):
    v1 = publish(embedded_model_path(), "v1")
    settings = settings_for(tmp_path)
    source = registry_source(settings)
    assert isinstance(source, HubSource)

    served, seen, problem = initial_model(settings, source)  # a fresh cache: downloaded at start-up
    first = served.identity
    served.llama.close()
    assert (first.source, first.repo, first.version, first.sha256, first.quant) == (
        "hub", REPO, "v1", v1.version.sha256, "Q4_1")
    assert first.revision == hub.repo(REPO).tags["v1"] and problem is None and seen == ("v1", v1.version.sha256)
    assert Path(first.path).is_relative_to(tmp_path / "hf_home")  # through the HF cache

    swaps = Swaps()
    watch = RegistryWatch(source, swaps, every=1.0, seen=seen)
    before = len(hub.requests)
    assert watch.poll() is None and swaps == []
    assert requests_since(hub, before) == [("HEAD", f"/{REPO}/resolve/main/current.json")]  # one small request

    v2 = publish(q8, "v2")
    assert watch.poll() == "v2"
    (now,) = swaps
    assert (now.version, now.sha256, now.quant, now.repo, now.revision) == (
        "v2", v2.version.sha256, "Q8_0", REPO, hub.repo(REPO).tags["v2"])
    assert watch.poll() is None and len(swaps) == 1

    HubRegistry(REPO).rollback("v1")  # as `python -m retrain rollback v1` does on the training host
    assert watch.poll() == "v1"
    assert (swaps[-1].version, swaps[-1].sha256) == ("v1", v1.version.sha256) and watch.problem is None


def test_the_hub_down_keeps_the_model_served_says_so_once_and_the_watch_catches_up(hub, tmp_path, q8, caplog):
    v1 = publish(embedded_model_path(), "v1")
    watch, swaps = watching_v1(tmp_path)
    v2 = publish(q8, "v2")

    hub.fail(503)
    with caplog.at_level(logging.ERROR, logger="space.registry_watch"):
        assert watch.poll() is None and watch.poll() is None
    assert swaps == [] and "cannot be read" in watch.problem and "503" in watch.problem
    said = [r for r in caplog.records if r.name == "space.registry_watch"]
    assert len(said) == 1 and "still serving the same model" in said[0].getMessage()

    # Back, but the download of v2 breaks off every time: nothing half-downloaded is served.
    hub.reset()
    hub.cut(1 << 20, path=r"/versions/v2/")
    assert watch.poll() is None and swaps == []
    assert "registry version v2 cannot be fetched now" in watch.problem

    hub.reset()
    assert watch.poll() == "v2" and watch.problem is None
    assert (swaps[-1].version, swaps[-1].sha256) == ("v2", v2.version.sha256)
    assert sha256_of(Path(swaps[-1].path)) == v2.version.sha256
    assert v1.version.sha256 != v2.version.sha256


def test_a_file_whose_sha256_is_not_its_records_is_refused_and_never_served(hub, tmp_path, q8):
    publish(embedded_model_path(), "v1")
    watch, swaps = watching_v1(tmp_path)

    publish(q8, "v2", sha256="e" * 64)  # its version.json names other bytes than the file on the Hub
    before = len(hub.requests)
    assert watch.poll() is None and swaps == []
    assert "registry version v2 cannot be served" in watch.problem and "eeeeeeeeeeee" in watch.problem
    gets = [p for m, p in requests_since(hub, before) if m == "GET" and p.endswith(".gguf")]
    assert len(gets) == 2  # the cached copy is downloaded once more before it is refused
    mark = len(hub.requests)
    assert watch.poll() is None and swaps == []  # skipped until current.json names another version
    assert requests_since(hub, mark) == [("HEAD", f"/{REPO}/resolve/main/current.json")]


def test_at_start_up_the_hub_down_serves_the_cached_version_or_the_configured_model(hub, tmp_path):
    v1 = publish(embedded_model_path(), "v1")
    settings = settings_for(tmp_path)

    hub.fail(503)
    served, seen, problem = initial_model(settings, registry_source(settings))  # empty cache: the configured model
    assert served.identity.source == "embedded" and served.identity.version is None and seen is None
    assert "cannot be read" in problem and "503" in problem
    served.llama.close()

    hub.reset()
    warm, _, _ = initial_model(settings, registry_source(settings))  # downloads v1 into the cache
    warm.llama.close()
    hub.fail(503)
    cached, seen, problem = initial_model(settings, registry_source(settings))
    assert (cached.identity.version, cached.identity.sha256, cached.identity.source) == ("v1", v1.version.sha256, "hub")
    assert seen == ("v1", v1.version.sha256) and "cannot be read" in problem
    cached.llama.close()


def test_a_version_caught_between_its_commit_and_its_tag_is_taken_once_tagged(hub, tmp_path, q8):
    from retrain.registry import PublishError

    publish(embedded_model_path(), "v1")
    watch, swaps = watching_v1(tmp_path)

    hub.fail(503, methods=("POST",), path="/tag/")  # the publish's commit lands, its tag does not (yet)
    version = ModelVersion(version="v2", file=q8.name, sha256=sha256_of(q8), bytes=q8.stat().st_size, quant="Q8_0",
                           base_sha256="0" * 64, run_id="run-v2")
    with pytest.raises(PublishError):
        HubRegistry(REPO, retry_waits=()).publish(q8, version)
    assert watch.poll() is None and swaps == [] and watch.problem is None  # not a problem: a publish under way

    hub.reset()
    HubRegistry(REPO).publish(q8, version)  # the publish stage run again: no new commit, the tag
    assert watch.poll() == "v2" and swaps[-1].sha256 == version.sha256


def test_the_pages_model_line_names_the_hub_version_and_says_what_keeps_a_new_one_from_being_served():
    from types import SimpleNamespace

    from schemas.flag import ModelIdentity
    from space.app import model_card

    identity = ModelIdentity(source="hub", repo=REPO, revision="a" * 40, path="/cache/x.gguf", file="model.gguf",
                             sha256="b" * 64, quant="Q8_0", version="v2")
    app = SimpleNamespace(served=SimpleNamespace(identity=identity), model_problem=lambda: None)
    line = model_card(app)
    assert f"{REPO}@aaaaaaaaaaaa" in line and "version v2" in line and "⚠" not in line
    app.model_problem = lambda: "registry version v3 cannot be fetched now (the Hub answered 503: <b>down</b>)"
    line = model_card(app)
    assert "⚠️ registry version v3 cannot be fetched now" in line and "<b>" not in line and "&lt;b&gt;" in line


def test_the_retraining_tab_shows_the_hub_version_the_app_follows_without_asking_the_hub(hub, tmp_path):
    from space.runs_view import serving_line

    settings = settings_for(tmp_path)
    assert serving_line(settings) == f"the configured model (nothing published yet in the Hub registry {REPO})"
    publish(embedded_model_path(), "v1")
    watching_v1(tmp_path)  # the app's start-up read current.json and v1 through the HF cache
    hub.fail(503)
    before = len(hub.requests)
    assert serving_line(settings).startswith("v1 · SmolLM2-135M-Instruct.Q4_1.gguf · Q4_1 · from run run-v1")
    assert len(hub.requests) == before
