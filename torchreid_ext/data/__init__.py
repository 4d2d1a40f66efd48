"""Datasets torchreid_ext registers into Torchreid's dataset registry."""
from typing import Dict

from .synthetic import SyntheticReID, SyntheticReIDSmall, SynthSpec, ensure_generated, generate  # noqa: F401

DATASETS: Dict[str, type] = {"synthreid": SyntheticReID, "synthreid_small": SyntheticReIDSmall}
