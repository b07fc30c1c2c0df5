"""The plots a reviewer reads at a glance, as data frames for gr.BarPlot: plain functions of the review rows.

Each takes the rows of ``feedback.review_table.review_rows`` (filtered or not) and returns a
small long-format frame: one row per bar segment, so a plot is ``gr.BarPlot(frame, x=..., y=...,
color=...)``.
"""

from __future__ import annotations

import pandas as pd

from feedback.review_table import NO_REASON, REASON_BITS, STATUSES


def flags_per_day_by_reason(rows: pd.DataFrame) -> pd.DataFrame:
    """Flags created per UTC day and reason: columns day ('YYYY-MM-DD'), reason, flags.

    A flag with several reasons counts once under each; one without a reason counts under NO_REASON.
    """
    days = rows["created_at"].dt.normalize()
    bits = rows["reason_bits"].to_numpy()
    parts = []
    for reason, bit in [*REASON_BITS.items(), (NO_REASON, 0)]:
        hit = (bits & bit) != 0 if bit else bits == 0
        counts = days[hit].value_counts()
        if len(counts):
            parts.append(pd.DataFrame({"day": counts.index, "reason": reason, "flags": counts.to_numpy()}))
    if not parts:
        return pd.DataFrame({"day": pd.Series(dtype=str), "reason": pd.Series(dtype=str),
                             "flags": pd.Series(dtype="int64")})
    out = pd.concat(parts, ignore_index=True).sort_values(["day", "reason"], kind="stable")
    out["day"] = out["day"].dt.strftime("%Y-%m-%d")
    return out.reset_index(drop=True)


def status_share(rows: pd.DataFrame) -> pd.DataFrame:
    """How many flags are pending, accepted and rejected: columns status, flags, share (% of all)."""
    counts = rows["status"].value_counts().reindex(list(STATUSES), fill_value=0)
    total = int(counts.sum())
    share = (counts / total * 100).round(1) if total else counts.astype(float)
    return pd.DataFrame({"status": list(STATUSES), "flags": counts.to_numpy().astype("int64"),
                         "share": share.to_numpy()})


def flags_per_model_version(rows: pd.DataFrame) -> pd.DataFrame:
    """Flags per model version that answered, split by status: columns model, status, flags."""
    counts = rows.groupby(["model_version", "status"], sort=True).size()
    out = counts.rename("flags").reset_index().rename(columns={"model_version": "model"})
    out["flags"] = out["flags"].astype("int64")
    return out
