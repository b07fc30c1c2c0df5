"""Feedback commands: `python -m feedback [--dir FOLDER] stats|validate|push|pull --to FOLDER`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feedback", description="Inspect the flag store.")
    parser.add_argument("--dir", help="feedback folder (default: FLAGLOOP_FEEDBACK_DIR or data/feedback)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="count flags by reason, thumbs, model and day")
    sub.add_parser("validate", help="check every record against the JSON Schema; report bad rows as file:line")
    push = sub.add_parser("push", help="push the records not yet on the Hub dataset repo now")
    push.add_argument("--repo", help="dataset repo 'owner/name' (default: FLAGLOOP_DATASET_REPO)")
    pull = sub.add_parser("pull", help="download the Hub dataset repo into a local feedback folder")
    pull.add_argument("--repo", help="dataset repo 'owner/name' (default: FLAGLOOP_DATASET_REPO)")
    pull.add_argument("--to", required=True, help="folder to put the flags/ and reviews/ shards in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    from schemas.settings import Settings

    if args.command in ("push", "pull"):
        from pydantic import ValidationError

        from schemas.errors import describe

        try:
            settings = Settings(**({"dataset_repo": args.repo} if args.repo else {}))
        except ValidationError as err:
            print(f"flagloop: invalid settings: {describe(err, prefix='FLAGLOOP_')}", file=sys.stderr)
            return 2
        return hub_command(args, settings)
    root = args.dir or Settings().feedback_dir
    if args.command == "stats":
        from feedback.stats import flag_stats

        print("\n".join(flag_stats(root).lines()))
        return 0
    from feedback.validate import validate_folder

    result = validate_folder(root)
    for problem in result.problems:
        print(problem)
    print(f"{result.rows} rows checked, {len(result.problems)} bad", file=sys.stderr)
    return 0 if result.ok else 1


def hub_command(args, settings) -> int:
    """`push` or `pull`: 0 when done, 1 (with one line saying why) when the Hub could not be used."""
    from huggingface_hub import HfApi

    from feedback.pull import PullError, pull_folder
    from feedback.sync import FolderPusher, SyncError, hub_token, install_http_timeout

    repo = settings.dataset_repo
    if repo is None:
        print("flagloop: no dataset repo: set FLAGLOOP_DATASET_REPO or pass --repo owner/name", file=sys.stderr)
        return 2
    # The sync's own lines (retries, the final failure) go to stderr as they happen.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flagloop: %(message)s"))
    for name in ("feedback.sync", "feedback.pull"):
        sync_log = logging.getLogger(name)
        sync_log.addHandler(handler)
        sync_log.setLevel(logging.WARNING)
        sync_log.propagate = False
    token = hub_token(settings)
    install_http_timeout()
    api = HfApi(token=token, library_name="flagloop")
    if args.command == "push":
        pusher = FolderPusher(api, repo, args.dir or settings.feedback_dir)
        try:
            result = pusher.push()
        except SyncError:
            return 1  # the sync logged why, in one line
        print(result.summary())
        print(pusher.status().line())
        return 0
    try:
        result = pull_folder(api, repo, args.to)
    except PullError as err:  # one line for the operator, not a traceback
        print(f"flagloop: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
