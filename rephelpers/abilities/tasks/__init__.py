"""Fixed tables the offline ability suite draws its items from (see :mod:`rephelpers.abilities.suite`).

The tables are written for the suite and are not taken from any corpus the workbench
clusters, so no ability item is also a pre-training document of the demo chain.
"""
