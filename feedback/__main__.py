"""Feedback commands: `python -m feedback stats|validate [--dir FOLDER]`."""

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    from schemas.settings import Settings

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


if __name__ == "__main__":
    sys.exit(main())
