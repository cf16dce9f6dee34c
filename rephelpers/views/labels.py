"""Cluster names for charts, the report and the explorers, read from stage 01's ``clusters.json``.

Its own module because both :mod:`rephelpers.views.charts` and :mod:`rephelpers.views.render`
need it, and neither should import the other for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
from typing import Mapping

import pandas as pd

from ..artifacts import RunDir
from ..errors import RephelpersError


def _run_root(run_dir: str | os.PathLike | RunDir) -> Path:
    """The folder of a run: a :class:`RunDir`'s root, else the path itself (a ``Path`` has a
    ``.root`` too, which is "/", so no duck typing here)."""
    return run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)


def cluster_names(run_dir: str | Path | RunDir) -> dict[int, str]:
    """``{cluster: name}`` from stage 01's ``clusters.json`` in ``run_dir`` ({} where there is none).

    The name is the characterisation's ``name`` (for k-means, BERTopic and LDA the cluster's
    top three c-TF-IDF terms; for ``domain`` the domain), else its first three ``top_terms``,
    else the clustering's ``names``. Pass it as ``cluster_labels`` to the charts,
    :func:`rephelpers.views.render.html_report` and :func:`rephelpers.views.explorers.item_explorer`, which then write ``3: name`` for cluster 3.
    """
    path = _run_root(run_dir) / "clusters.json"
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RephelpersError(f"{path} is not valid JSON ({err}): re-run notebook 01_corpus_clusters to rewrite it") from err
    names = {k: str(n) for k, n in enumerate(report.get("names") or []) if n}
    for row in report.get("clusters") or []:
        terms = [str(t) for t in row.get("top_terms") or []]
        name = row.get("name") or ", ".join(terms[:3])
        if "cluster" in row and name:
            names[int(row["cluster"])] = str(name)
    return names


def _name_clusters_in_text(text: str, cluster_labels: Mapping[int, str] | None) -> str:
    """``cluster 3`` → ``cluster 3 (name)`` wherever cluster 3 has a name."""
    if not cluster_labels:
        return text

    def named(match: re.Match) -> str:
        name = cluster_labels.get(int(match.group(1)))
        return f"{match.group(0)} ({name})" if name else match.group(0)

    return re.sub(r"\bcluster (-?\d+)\b(?! \()", named, text)


def _name_clusters_in_table(table: pd.DataFrame, cluster_labels: Mapping[int, str] | None) -> pd.DataFrame:
    """A ``cluster name`` column right after ``cluster`` (a table without one is returned as is)."""
    if not cluster_labels or "cluster" not in table.columns or "cluster name" in table.columns:
        return table
    named = table.copy()
    names = [cluster_labels.get(int(k), "") if pd.notna(k) and float(k).is_integer() else "" for k in named["cluster"]]
    named.insert(named.columns.get_loc("cluster") + 1, "cluster name", names)
    return named


def cluster_label(cluster: int, cluster_labels: Mapping[int, str] | None) -> str:
    """``3: name`` where cluster 3 has a name in ``cluster_labels``, else ``cluster 3``."""
    name = (cluster_labels or {}).get(int(cluster))
    return f"{int(cluster)}: {name}" if name else f"cluster {int(cluster)}"
