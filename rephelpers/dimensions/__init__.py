"""Stage 03 (notebook ``03_cluster_dimensions``): what ties dimensions and subspaces to a cluster.

- :mod:`.association`: S(i,k), R_k by τ or top-k, v_k, V_k, NMF, and the stage's artifacts;
- :mod:`.probes`: linear and MLP probes and their weights;
- :mod:`.mediation`: causal mediation of single dimensions.
"""
