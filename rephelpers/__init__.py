"""rephelpers: which pre-training data clusters give a language model which abilities.

The chain, one subpackage per stage (see README): ``corpus`` (01) → ``representations`` (02)
→ ``dimensions`` (03) → ``perturbations`` (04) → ``abilities`` (05) → ``influence`` (06), with
``testbed`` (07) scoring the chain against known answers and ``views`` drawing every stage;
all of it flows through a run directory (``artifacts``).
"""

__version__ = "0.1.0"

from .errors import RephelpersError  # noqa: F401
