"""The feedback store: durable JSONL shards of FlagRecords, read back as a datasets.Dataset."""

from feedback.reader import BadLine, latest_flags, read_flags
from feedback.store import FlagStore

__all__ = ["BadLine", "FlagStore", "latest_flags", "read_flags"]
