"""A sweep's results: collecting every point's result table in one, with the point's parameters as columns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .status import STATUS, read_status

SHARED = "_shared"
"""The sweep's folder for the stages no grid key reaches (run once, linked into every point)."""


def collect(top: str | os.PathLike, artifact: str = "influence.parquet") -> pd.DataFrame:
    """Concatenate ``artifact`` from every point of a sweep, with the point's parameters as columns."""
    top = Path(top)
    frames, failures = [], []
    for status_file in sorted(top.glob(f"*/{STATUS}")):
        run_dir = status_file.parent
        if run_dir.name == SHARED:
            continue
        status = read_status(run_dir)
        if status.get("state") != "done":
            failures.append({"point": run_dir.name, "state": status.get("state"), "error": status.get("error")})
            continue
        path = run_dir / artifact
        if path.exists():
            df = pd.read_parquet(path)
            for k, v in (status.get("point") or {}).items():
                df[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
            df["point"] = run_dir.name
            frames.append(df)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frames:
        table.to_parquet(top / "results.parquet", index=False)
    pd.DataFrame(failures, columns=["point", "state", "error"]).to_csv(top / "failures.csv", index=False)
    return table
