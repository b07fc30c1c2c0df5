"""Validation errors as one readable line: where, what was given, what is wrong."""

from __future__ import annotations

from pydantic import ValidationError


def describe(err: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """``loc: message (got 'value')`` for the first errors, joined by '; '.

    With ``prefix`` (e.g. "FLAGLOOP_") the location is spelled as the environment variable.
    """
    parts = []
    for e in err.errors(include_url=False)[:limit]:
        loc = [str(p) for p in e["loc"]]
        where = (prefix + "__".join(loc).upper()) if prefix else ".".join(loc) or "record"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}: {e['msg']}{got}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
