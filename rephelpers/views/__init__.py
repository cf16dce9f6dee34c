"""What a person looks at, for every stage: charts, saved figures, the report, explorers.

- :mod:`.charts`: every altair chart the notebooks draw, by stage (each takes a table a
  stage wrote and computes nothing);
- :mod:`.render`: saving charts (HTML + PNG), the offline JupyterLab renderer, cluster
  names in labels, the self-contained HTML report;
- :mod:`.explorers`: the ipywidgets explorers, one per notebook (01 clusters, 04
  specificity, 05 answers, 06 items).
"""
