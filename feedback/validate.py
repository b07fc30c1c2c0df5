"""Check every line of every shard against the exported JSON Schema; report bad rows as file:line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from feedback.reader import shard_paths

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "flag_record.schema.json"


@dataclass
class Problem:
    file: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"


@dataclass
class Validation:
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_folder(root: str | Path, schema_file: Path = SCHEMA_FILE) -> Validation:
    """Every row under ``root`` checked against the JSON Schema other tools would use."""
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    result = Validation()
    for path in shard_paths(root):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                result.rows += 1
                torn = "" if raw.endswith(b"\n") else " (torn last line: a write cut short by a crash)"
                try:
                    row = json.loads(raw)
                except ValueError as err:
                    result.problems.append(Problem(str(path), number, f"not JSON: {err}{torn}"))
                    continue
                errors = sorted(validator.iter_errors(row), key=lambda e: list(e.absolute_path))
                if errors:
                    first = errors[0]
                    where = "/".join(str(p) for p in first.absolute_path) or "record"
                    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
                    result.problems.append(Problem(str(path), number, f"{where}: {first.message}{more}{torn}"))
    return result
