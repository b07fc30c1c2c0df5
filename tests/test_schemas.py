"""FlagRecord: what it accepts, what it refuses, and its exported JSON Schema."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import schemas.__main__ as export
from schemas.flag import REASONS, ChatMessage, FlagRecord, ModelIdentity
from schemas.review import ReviewDecision
from tests.records import make_flag

SCHEMAS = Path(export.__file__).parent


def test_exported_json_schema_is_current():
    for name, model in export.SCHEMA_FILES.items():
        on_disk = (SCHEMAS / name).read_text()
        assert on_disk == export.render(model), f"{name} is stale: run `python -m schemas`"


def test_json_schema_validates_a_real_record_and_rejects_an_unknown_reason():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "flag_record.schema.json").read_text())
    row = json.loads(make_flag().model_dump_json())
    jsonschema.validate(row, schema)
    row["reasons"] = ["bad-vibes"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(row, schema)


def test_record_carries_every_field_design_lists():
    fields = set(FlagRecord.model_fields)
    assert {
        "schema_version", "flag_id", "created_at", "updated_at", "session_id", "conversation", "model",
        "generation", "system_prompt", "reasons", "comment", "correction", "thumbs", "app_version",
    } <= fields
    assert {"source", "repo", "revision", "file", "sha256", "quant"} <= set(FlagRecord.model_fields["model"].annotation.model_fields)


def test_unknown_reason_is_refused_with_the_taxonomy():
    with pytest.raises(ValidationError, match="incorrect"):
        make_flag(reasons=["bad-vibes"])


def test_reasons_cover_the_taxonomy_and_repeat_once():
    assert set(REASONS) >= {"incorrect", "hallucinated", "unhelpful", "incomplete", "unsafe", "offensive",
                            "formatting", "off-topic", "other"}
    assert make_flag(reasons=["other", "other", "unsafe"]).reasons == ["other", "unsafe"]


def test_conversation_must_end_with_the_flagged_answer():
    with pytest.raises(ValidationError, match="assistant answer"):
        make_flag(conversation=[ChatMessage(role="user", content="hi")])


def test_invalid_unicode_is_refused_clearly():
    with pytest.raises(ValidationError, match="invalid unicode"):
        make_flag(comment="broken \ud800 text")
    with pytest.raises(ValidationError, match="invalid unicode"):
        ChatMessage(role="user", content="\udfff")


def test_invalid_unicode_in_a_review_decision_is_refused_clearly():
    with pytest.raises(ValidationError, match="invalid unicode"):
        ReviewDecision(flag_id="f", flag_record_id="r", action="accept", reviewer="ana", correction="a \ud800")
    with pytest.raises(ValidationError, match="invalid unicode"):
        ReviewDecision(flag_id="f", flag_record_id="r", action="reject", reviewer="ana", note="\udfff")


def test_flags_read_back_share_one_model_identity_and_different_ones_stay_apart():
    a, b = make_flag(), make_flag()
    read = [FlagRecord.model_validate_json(f.model_dump_json()) for f in (a, b)]
    assert read[0].model is read[1].model and read[0].model == a.model
    other = FlagRecord.model_validate_json(make_flag(model=a.model.model_copy(update={"quant": "Q8_0"})).model_dump_json())
    assert other.model.quant == "Q8_0" and other.model is not read[0].model


def test_model_identities_built_in_python_are_each_filled_in():
    # ModelIdentity(...) validates into the new object: it must never be handed a shared one instead.
    fields = json.loads(make_flag().model.model_dump_json())
    FlagRecord.model_validate_json(make_flag().model_dump_json())  # an identity now shared for JSON
    built = [ModelIdentity(**fields) for _ in range(2)] + [ModelIdentity.model_validate(fields)]
    assert all(m.sha256 == fields["sha256"] and m.model_dump() == fields for m in built)


def test_a_model_identity_that_is_not_one_is_still_refused_with_its_field():
    row = json.loads(make_flag().model_dump_json())
    with pytest.raises(ValidationError, match=r"model\.quant"):
        FlagRecord.model_validate({**row, "model": {**row["model"], "quant": ["Q4_1"]}})  # unhashable value
    with pytest.raises(ValidationError, match=r"model\.sha256"):
        FlagRecord.model_validate({**row, "model": {k: v for k, v in row["model"].items() if k != "sha256"}})


def test_unknown_fields_are_refused():
    row = json.loads(make_flag().model_dump_json())
    row["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        FlagRecord.model_validate(row)


def test_record_round_trips_through_json():
    rec = make_flag(comment="<script>alert(1)</script> ![x](http://127.0.0.1:1/x.png) é 中")
    assert FlagRecord.model_validate_json(rec.model_dump_json()) == rec


def test_review_decision_refuses_a_rejection_with_a_correction_and_an_empty_edit():
    from schemas.review import ReviewDecision

    ok = ReviewDecision(flag_id="f", flag_record_id="r", action="accept", correction="Shangdu.", reviewer="ana")
    assert ok.schema_version == 1 and ok.decision_id
    with pytest.raises(ValidationError, match="rejected flag has no correction"):
        ReviewDecision(flag_id="f", flag_record_id="r", action="reject", correction="x", reviewer="ana")
    with pytest.raises(ValidationError, match="cannot be empty"):
        ReviewDecision(flag_id="f", flag_record_id="r", action="accept", correction="  ", reviewer="ana")
