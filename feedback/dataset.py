"""Load the flags as a ``datasets.Dataset`` whose features are derived from the FlagRecord schema."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from enum import Enum
from pathlib import Path

import datasets
from pydantic import BaseModel

from feedback.reader import latest_flags, read_flags
from schemas.flag import FlagRecord

_SCALARS = {str: "string", int: "int64", float: "float64", bool: "bool", datetime: "timestamp[us, tz=UTC]"}


def _feature(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # schemas.flag.Text: a str with a validator
        return _feature(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no dataset feature for the union {annotation}")
        return _feature(args[0])  # every feature is nullable
    if origin is typing.Literal:
        kinds = {type(a) for a in typing.get_args(annotation)}
        return _feature(kinds.pop()) if len(kinds) == 1 else datasets.Value("string")
    if origin is list:
        (item,) = typing.get_args(annotation)
        return datasets.List(_feature(item))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return features_of(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return datasets.Value("string")
    if annotation in _SCALARS:
        return datasets.Value(_SCALARS[annotation])
    raise TypeError(f"no dataset feature for {annotation}")


def features_of(model: type[BaseModel]) -> datasets.Features:
    """Dataset features with one column per field of ``model``, nested models as structs."""
    return datasets.Features({name: _feature(f.annotation) for name, f in model.model_fields.items()})


def flag_features() -> datasets.Features:
    return features_of(FlagRecord)


def load_flags_dataset(root: str | Path, latest: bool = True) -> datasets.Dataset:
    """The flags under ``root`` as a Dataset: the latest revision of each flag, or every revision."""
    records = list(latest_flags(root).records.values()) if latest else read_flags(root).records
    rows = [r.model_dump(mode="python") for r in records]
    features = flag_features()
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)
