"""Run the app: `python -m space` (settings from FLAGLOOP_* variables or flagloop.toml)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phone-home at start-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m space", description="Chat with a GGUF model and flag its answers.")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 7860)")
    parser.add_argument("--model-path", help="local GGUF file to serve")
    parser.add_argument("--feedback-dir", help="folder for the flag shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from feedback.store import FlagStore
    from feedback.sync import start_sync
    from retrain.registry import LocalRegistry
    from schemas.errors import describe
    from schemas.settings import Settings
    from space.app import App, build_demo
    from space.model import ModelError
    from space.registry_watch import RegistryWatch, initial_model, load_version
    from space.review import ReviewApp

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
        registry = LocalRegistry(settings.registry_dir)
        served, seen = initial_model(settings, registry)  # the registry's current version, else the configured model
        store = FlagStore(settings.feedback_dir, max_bytes=settings.shard_max_bytes)
        review = ReviewApp(settings)
    except ValidationError as err:
        print(f"flagloop: invalid settings: {describe(err, prefix='FLAGLOOP_')}", file=sys.stderr)
        return 2
    except SettingsError as err:  # a variable that should hold JSON does not
        print(f"flagloop: invalid settings: {err}", file=sys.stderr)
        return 2
    except (ModelError, OSError) as err:
        print(f"flagloop: {err}", file=sys.stderr)
        return 2
    sync = start_sync(settings)  # None unless a dataset repo and a token are configured
    if sync is not None:
        review.sync_status = lambda: sync.status().line()  # reviewers see the last push, pending, last error
    app = App(settings, served, store)
    # A new registry version (a publish or a rollback) is loaded in the background and swapped in between answers.
    watch = RegistryWatch(registry, lambda version: load_version(settings, registry, version), app.swap_model,
                          every=settings.registry_poll_seconds, seen=seen).start()
    demo = build_demo(app, review)
    demo.queue(default_concurrency_limit=None)
    print(f"flagloop: flags are saved under {store.dir.resolve()}", flush=True)
    # A container stop (Spaces) sends SIGTERM: leave through `finally` for the last push.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.launch(server_name=settings.host, server_port=settings.port, show_error=True)
    finally:
        watch.stop(timeout=10)
        store.close()
        review.close()
        if sync is not None:
            sync.shutdown()  # the last push (waits at most 30 s), then the timer stops
    return 0


if __name__ == "__main__":
    sys.exit(main())
