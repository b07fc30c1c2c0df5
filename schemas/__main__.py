"""Write the JSON Schema of every record to schemas/*.schema.json: `python -m schemas`."""

import json
from pathlib import Path

from schemas.flag import FlagRecord
from schemas.hub import PullState
from schemas.registry import ModelVersion
from schemas.review import ReviewDecision
from schemas.run import RunManifest, RunState
from schemas.sft import KTORow, PreferenceRow, SFTRow

SCHEMA_FILES = {
    "flag_record.schema.json": FlagRecord,
    "review_decision.schema.json": ReviewDecision,
    "sft_row.schema.json": SFTRow,
    "preference_row.schema.json": PreferenceRow,
    "kto_row.schema.json": KTORow,
    "run_manifest.schema.json": RunManifest,
    "run_state.schema.json": RunState,
    "model_version.schema.json": ModelVersion,
    "pull_state.schema.json": PullState,
}
HERE = Path(__file__).parent


def render(model) -> str:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, model in SCHEMA_FILES.items():
        (HERE / name).write_text(render(model))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
