"""Datasets torchreid_ext registers into Torchreid's dataset registry."""
from typing import Dict

DATASETS: Dict[str, type] = {}
