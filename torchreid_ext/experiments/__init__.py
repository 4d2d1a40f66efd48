"""Experiment harness: run configs in one protocol (``runs``), report them (``report``,
``published``), the ``scripts/compare.py`` entry point (``compare``), rank lists (``ranks``)."""
from .published import PUBLISHED, method_label, published_for  # noqa: F401
from .runs import HarnessError, Run, plan_runs  # noqa: F401
