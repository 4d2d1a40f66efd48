"""Experiment harness: run configs over seeds in one protocol (``runs``), summarise them
(``stats``, ``summary``), report them (``report``, ``plot``, ``published``), the
``scripts/compare.py`` entry point (``compare``), rank lists (``ranks``)."""
from .published import PUBLISHED, method_label, published_for  # noqa: F401
from .runs import HarnessError, Run, plan_runs  # noqa: F401
