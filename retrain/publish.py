"""publish: put a run's verified GGUF in the model registry, as the version the app serves next.

    >>> version = publish_version(settings, run_dir, run_dir / "export/model.gguf", manifest, gate, metrics)
    >>> version.version
    'v3'
    >>> rollback(settings, "v2")

What "published" means: `publish_version` returning a ModelVersion means the version is current in
the local registry (`settings.registry_dir`; the app swaps to it at its next poll) and, when
`settings.registry_repo` is set, committed and tagged on that Hub model repo too. The local registry
goes first: when the Hub then fails (after retries), PublishError is raised, and the version stays
current locally (served) but is NOT published on the Hub; running the stage again for the same run
reuses the local version (same run id and sha256: no new number) and pushes it to the Hub.

`<run_dir>/publish.json` says where the version went: {"version", "sha256", "local", "hub": {repo, commit, tag} | null}.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from feedback.files import write_atomic
from retrain.registry import HubRegistry, LocalRegistry, PublishError, RegistryError
from schemas.registry import GateReport, ModelVersion
from schemas.run import RunManifest
from space.model import sha256_of

log = logging.getLogger(__name__)

REPORT = "publish.json"


def publish_version(settings, run_dir: Path, gguf: Path, manifest: RunManifest, gate_report: GateReport | None,
                    metrics: dict | None = None) -> ModelVersion:
    """Publish `gguf` (local registry, then the Hub when configured); return its ModelVersion. See the module doc."""
    run_dir, gguf = Path(run_dir), Path(gguf)
    if gate_report is not None and not gate_report.passed:
        raise PublishError(f"run {manifest.run_id} did not pass the gate ({gate_report.reason}): it is not published")
    local = LocalRegistry(settings.registry_dir)
    hub = hub_registry(settings) if settings.registry_repo else None
    hub_error = None
    try:
        # Another host (or this one before its disk was wiped: HF Jobs) may have published versions
        # this registry never saw: a new version takes a number after theirs.
        number = hub.next_number() if hub is not None else 1
    except RegistryError as err:
        number, hub_error = 1, err
    fields = dict(manifest=manifest, base_sha256=manifest.base.sha256, run_id=manifest.run_id,
                  dataset_revision=manifest.dataset_revision, metrics=metrics or {}, gate=gate_report)
    version = _already_published(local, manifest.run_id, gguf)
    if version is None:
        version = local.publish(gguf, min_number=number, **fields)
    elif hub is not None and hub_error is None and not hub.free_for(version):
        # Published here while the Hub could not be read, and that number is taken there since.
        log.warning("the Hub repo %s already has another %s: publishing this run's GGUF again as a new version",
                    settings.registry_repo, version.version)
        version = local.publish(local.path_of(version), min_number=number, **fields)
    report = {"version": version.version, "sha256": version.sha256, "local": str(local.path_of(version)), "hub": None}
    _write_report(run_dir, report)
    if hub is not None:
        try:
            if hub_error is not None:
                raise hub_error
            release = hub.publish(local.path_of(version), version, manifest=manifest)
        except RegistryError as err:  # PublishError, or a read that failed
            raise PublishError(
                f"{version.version} is published in the local registry {local.root} (and served), but NOT on the "
                f"Hub repo {settings.registry_repo}: {err}. Run the publish stage again to push it."
            ) from err
        report["hub"] = {"repo": release.repo, "commit": release.commit, "tag": release.tag}
        _write_report(run_dir, report)
    return version


def rollback(settings, version: str) -> ModelVersion:
    """Serve an older version again: on the Hub repo when one is configured, and in the local registry.

    With a Hub repo, the local registry may lack the version (another host published it, or this
    host's disk is new): the Hub is rolled back alone, and the app following it serves that version.
    """
    local = LocalRegistry(settings.registry_dir)
    if not settings.registry_repo:
        return local.rollback(version)
    try:
        record = local.get(version)
    except RegistryError:
        record = None
    if record is not None:
        local.rollback(version)
    try:
        release = hub_registry(settings).rollback(version)
    except RegistryError as err:  # PublishError, or a read that failed
        if record is None:
            raise
        raise PublishError(
            f"the local registry {local.root} serves {version} again, but the Hub repo {settings.registry_repo} "
            f"still names its old current version: {err}. Run the rollback again."
        ) from err
    return record if record is not None else release.version


def hub_registry(settings) -> HubRegistry:
    """The Hub registry of `settings.registry_repo`, with the token the feedback sync uses."""
    from feedback.sync import hub_token, install_http_timeout

    install_http_timeout()  # a Hub that never answers fails the publish instead of holding it forever
    return HubRegistry(settings.registry_repo, token=hub_token(settings), base_model=card_base_model(settings))


def card_base_model(settings) -> str | None:
    """The Hub model id the card names as base_model, when one is known (a local path or the embedded file is not)."""
    for candidate in (settings.retrain.train.base_model, settings.model_repo):
        if candidate and re.fullmatch(r"[\w.-]+/[\w.-]+", candidate) and not Path(candidate).exists():
            return candidate
    return None


def _already_published(local: LocalRegistry, run_id: str, gguf: Path) -> ModelVersion | None:
    """The version this run already put in the registry (a resumed run), made current if it was left behind."""
    mine = [v for v in local.versions() if v.run_id == run_id]
    if not mine:
        return None
    sha256 = sha256_of(gguf)
    same = [v for v in mine if v.sha256 == sha256]
    if not same:
        return None
    version = same[-1]
    newest = local.versions()[-1]
    current = local.current()
    if newest.version == version.version and (current is None or current.version != version.version):
        # Killed between the version's folder and the pointer: finish that publish.
        local.rollback(version.version)
    log.info("run %s already published %s: reusing it", run_id, version.version)
    return version


def _write_report(run_dir: Path, report: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / REPORT, json.dumps(report, indent=2).encode() + b"\n")
