"""Estimators of the Data Influence Matrix Φ beside perturbation (influence functions, RepSim, BM25)."""
