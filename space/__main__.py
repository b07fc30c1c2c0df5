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
    watch: RegistryWatch
    demo: gr.Blocks

    def close(self) -> None:
        self.watch.stop(timeout=10)
        self.store.close()
        self.review.close()
        if self.sync is not None:
            self.sync.shutdown()  # the last push (waits at most 30 s), then the timer stops


def start(overrides: dict) -> Started:
    """Build the app from Settings (overrides first): model, store, review page, Hub sync, registry watch."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from feedback.store import FlagStore
    from feedback.sync import start_sync
    from retrain.registry import LocalRegistry
    from schemas.errors import describe
    from schemas.settings import Settings
    from space.app import App, build_demo, calm_queue
    from space.model import ModelError
    from space.registry_watch import RegistryWatch, initial_model, load_version
    from space.review import ReviewApp

    try:
        settings = Settings(**overrides)
        registry = LocalRegistry(settings.registry_dir)
        served, seen = initial_model(settings, registry)  # the registry's current version, else the configured model
        store = FlagStore(settings.feedback_dir, max_bytes=settings.shard_max_bytes)
        review = ReviewApp(settings)
    except ValidationError as err:
        raise StartupError(f"invalid settings: {describe(err, prefix='FLAGLOOP_')}") from err
    except SettingsError as err:  # a variable that should hold JSON does not
        raise StartupError(f"invalid settings: {err}") from err
    except (ModelError, OSError) as err:
        raise StartupError(str(err)) from err
    sync = start_sync(settings)  # None unless a dataset repo and a token are configured
    if sync is not None:
        review.sync_status = lambda: sync.status().line()  # reviewers see the last push, pending, last error
    app = App(settings, served, store)
    # A new registry version (a publish or a rollback) is loaded in the background and swapped in between answers.
    watch = RegistryWatch(registry, lambda version: load_version(settings, registry, version), app.swap_model,
                          every=settings.registry_poll_seconds, seen=seen).start()
    demo = build_demo(app, review)
    demo.queue(default_concurrency_limit=None)
    calm_queue(demo)
    return Started(settings, store, review, sync, watch, demo)


def serve(overrides: dict, check: bool = False) -> int:
    """Start the app and serve it until stopped; 2 (one line on stderr) if it cannot start.

    `check`: build everything, then stop without serving (the Space's `python app.py --check`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
