"""rephelpers: which pre-training data clusters give a language model which abilities.

The chain, one module per stage (see README):
corpus/clustering → activations → association → perturbations/intervene/similarity →
abilities/evaluation → impact/stats, all flowing through a run directory (artifacts).
"""

__version__ = "0.1.0"

from .errors import RephelpersError  # noqa: F401
