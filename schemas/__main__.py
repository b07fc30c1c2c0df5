"""Write the JSON Schema of every record to schemas/*.schema.json: `python -m schemas`."""

import json
from pathlib import Path

from schemas.flag import FlagRecord
from schemas.review import ReviewDecision

SCHEMA_FILES = {"flag_record.schema.json": FlagRecord, "review_decision.schema.json": ReviewDecision}
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
