"""Stage 06 (notebook ``06_influence_matrix``): from item scores to AIS, ACE and Φ.

- :mod:`.impact`: the formulas (M(f,a), AIS, ACE, Φ, dose-response);
- :mod:`.stats`: paired tests against the control distribution, intervals, corrections;
- :mod:`.calibration`: false-positive rates of those tests on simulated nulls.
"""
