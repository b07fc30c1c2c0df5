"""Run the app: `python -m space` (settings from FLAGLOOP_* variables or flagloop.toml).

`python -m space deploy --repo owner/name` uploads it as a Hugging Face Space instead (space/deploy.py);
the Space's app.py runs `serve` below, so both start the app the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for real in `start`: `python -m space deploy` needs neither gradio nor llama.cpp
    import gradio as gr

    from feedback.restore import Restore
    from feedback.store import FlagStore
    from feedback.sync import HubSync
    from schemas.settings import Settings
    from space.registry_watch import RegistryWatch
    from space.review import ReviewApp

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phone-home at start-up


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["deploy"]:
        from space.deploy import main as deploy_main

        return deploy_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m space", description="Chat with a GGUF model and flag its answers.",
        epilog="python -m space deploy --help: upload the app as a Hugging Face Space.",
    )
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 7860)")
    parser.add_argument("--model-path", help="local GGUF file to serve")
    parser.add_argument("--feedback-dir", help="folder for the flag shards")
    args = parser.parse_args(argv)
    return serve({k: v for k, v in vars(args).items() if v is not None})


class StartupError(Exception):
    """The app cannot start; the message is one line (bad settings, a model that does not load, ...)."""


@dataclass
class Started:
    """The app's running parts, built by `start`; `close` stops them (the last push to the Hub included)."""

    settings: Settings
    store: FlagStore
    review: ReviewApp
    sync: HubSync | None
    restore: Restore | None
    watch: RegistryWatch
    demo: gr.Blocks

    def close(self) -> None:
        self.watch.stop(timeout=10)
        if self.restore is not None:
            self.restore.stop()
        self.store.close()
        self.review.close()
        if self.sync is not None:
            self.sync.shutdown()  # the last push (waits at most 30 s), then the timer stops


def start(overrides: dict) -> Started:
    """Build the app from Settings (overrides first): model, store, review page, Hub sync and restore, registry watch."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from feedback.store import FlagStore
    from feedback.sync import hub_token, start_sync
    from schemas.errors import describe
    from schemas.settings import Settings
    from space.app import App, build_demo, calm_queue
    from space.model import ModelError
    from space.registry_watch import RegistryWatch, initial_model, registry_source
    from space.review import ReviewApp

    try:
        settings = Settings(**overrides)
        if settings.registry_repo or settings.dataset_repo:
            from feedback.sync import install_http_timeout

            install_http_timeout()  # a Hub that never answers fails a request instead of holding a thread forever
        source = registry_source(settings, token=hub_token(settings))  # the Hub registry with registry_repo set
        # The registry's current version, else the configured model.
        served, seen, problem = initial_model(settings, source)
        store = FlagStore(settings.feedback_dir, max_bytes=settings.shard_max_bytes)
        review = ReviewApp(settings)
    except ValidationError as err:
        raise StartupError(f"invalid settings: {describe(err, prefix='FLAGLOOP_')}") from err
    except SettingsError as err:  # a variable that should hold JSON does not
        raise StartupError(f"invalid settings: {err}") from err
    except (ModelError, OSError) as err:
        raise StartupError(str(err)) from err
    restore = start_restore(settings)  # a fresh disk gets its flags and decisions back from the dataset repo
    sync = start_sync(settings)  # None unless a dataset repo and a token are configured
    if sync is not None or restore is not None:
        review.sync_status = lambda: hub_lines(sync, restore)  # reviewers see the restore, the last push, any error
    app = App(settings, served, store)
    # A new registry version (a publish or a rollback) is loaded in the background and swapped in between answers.
    watch = RegistryWatch(source, app.swap_model, every=settings.registry_poll_seconds, seen=seen,
                          problem=problem).start()
    app.model_problem = lambda: watch.problem  # shown on the page's model line
    demo = build_demo(app, review)
    demo.queue(default_concurrency_limit=None)
    calm_queue(demo)
    return Started(settings, store, review, sync, restore, watch, demo)


def start_restore(settings) -> Restore | None:
    """Pull the feedback folder from `dataset_repo` in the background; None without a dataset repo."""
    if settings.dataset_repo is None:
        return None
    from huggingface_hub import HfApi

    from feedback.restore import Restore
    from feedback.sync import hub_token

    return Restore(HfApi(token=hub_token(settings), library_name="flagloop"), settings.dataset_repo,
                   settings.feedback_dir).start()


def hub_lines(sync, restore) -> str:
    """The review page's Hub line: the restore while it runs, then the push status."""
    restoring = restore.line() if restore is not None else None
    lines = [restoring] if restoring else []
    if sync is not None:
        lines.append(sync.status().line())
    return " · ".join(lines) or f"Restored the feedback folder from the Hub dataset {restore.repo_id}"


def serve(overrides: dict, check: bool = False) -> int:
    """Start the app and serve it until stopped; 2 (one line on stderr) if it cannot start.

    `check`: build everything, then stop without serving (the Space's `python app.py --check`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per Hub request (a registry poll every few s)
    try:
        started = start(overrides)
    except StartupError as err:
        print(f"flagloop: {err}", file=sys.stderr)
        return 2
    settings = started.settings
    if check:
        started.close()
        print(f"flagloop: the app builds; it would serve on {settings.host}:{settings.port}", flush=True)
        return 0
    print(f"flagloop: flags are saved under {started.store.dir.resolve()}", flush=True)
    # A container stop (Spaces) sends SIGTERM: leave through `finally` for the last push.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        started.demo.launch(server_name=settings.host, server_port=settings.port, show_error=True)
    finally:
        started.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
