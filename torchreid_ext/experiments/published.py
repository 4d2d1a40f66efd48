"""Published rank-1 / mAP (%) that our configs aim at (docs/methods.md R, S5), and method labels.

One table, keyed by (method, dataset). A method is identified by what a run records in its
``metrics.json``: model name, loss name and whether MSGR is on.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ["Published", "PUBLISHED", "METHOD_LABELS", "method_label", "published_for"]


class Published(NamedTuple):
    rank1: Optional[float]  # percent; None where the source gives only mAP
    mAP: float  # percent
    source: str


# (model, loss, msgr enabled) -> label used in tables and plots
METHOD_LABELS: Dict[Tuple[str, str, bool], str] = {
    ("osnet_x1_0", "softmax", False): "OSNet",
    ("osnet_x1_0", "drsl", False): "OSNet+DRSL",
    ("resnet50_bnfc512", "softmax", False): "R50",
    ("msfl_resnet50_csip", "softmax", False): "R50+CSIP",
    ("msfl_resnet50", "softmax", False): "+MSFF (MSFL)",
    ("msfl_resnet50", "softmax", True): "+MSGR (MSFL+MSGR)",
    ("resnet50_bnfc512", "softmax", True): "R50+MSGR",
    ("resnet50_bnfc512", "drsl", False): "R50+DRSL",
    ("resnet50", "sn", False): "R50+SN",
}

_T4 = "MSFL paper Table IV"
_ZOO = "Torchreid model zoo"
# (label, Torchreid dataset name) -> published numbers. cuhk03 = detected boxes, new protocol.
PUBLISHED: Dict[Tuple[str, str], Published] = {
    ("R50", "market1501"): Published(90.4, 78.3, _T4),
    ("R50+CSIP", "market1501"): Published(91.5, 79.3, _T4),
    ("+MSFF (MSFL)", "market1501"): Published(92.3, 81.9, _T4),
    ("+MSGR (MSFL+MSGR)", "market1501"): Published(93.7, 83.6, _T4),
    ("R50", "cuhk03"): Published(63.4, 58.3, _T4),
    ("R50+CSIP", "cuhk03"): Published(65.6, 60.4, _T4),
    ("+MSFF (MSFL)", "cuhk03"): Published(65.1, 61.2, _T4),
    ("+MSGR (MSFL+MSGR)", "cuhk03"): Published(67.7, 63.3, _T4),
    ("R50", "dukemtmcreid"): Published(82.9, 70.6, _T4),
    ("R50+CSIP", "dukemtmcreid"): Published(84.1, 74.5, _T4),
    ("+MSFF (MSFL)", "dukemtmcreid"): Published(85.7, 75.4, _T4),
    ("+MSGR (MSFL+MSGR)", "dukemtmcreid"): Published(86.8, 76.9, _T4),
    ("R50", "msmt17"): Published(None, 38.9, _T4),
    ("R50+CSIP", "msmt17"): Published(None, 40.2, _T4),
    ("+MSFF (MSFL)", "msmt17"): Published(None, 40.8, _T4),
    ("+MSGR (MSFL+MSGR)", "msmt17"): Published(71.3, 45.3, _T4),
    ("R50+MSGR", "market1501"): Published(91.7, 80.1, "MSFL paper Table III"),
    ("OSNet", "market1501"): Published(94.2, 82.6, _ZOO),
    ("OSNet", "dukemtmcreid"): Published(87.0, 70.2, _ZOO),
    ("OSNet", "msmt17"): Published(74.9, 43.8, _ZOO),
    ("R50+SN", "market1501"): Published(88.27, 73.43, "SN paper (single query)"),
}


def method_label(model: str, loss: str, msgr: bool, variant: bool = False) -> str:
    """Table label of a run; ``variant`` (non-default MSFL switches) keeps it off the known rows."""
    key = (model, loss, bool(msgr))
    if key in METHOD_LABELS and not variant:
        return METHOD_LABELS[key]
    return f"{model} {loss}" + (" +MSGR" if msgr else "") + (" (variant)" if variant else "")


def published_for(label: str, dataset: str, cuhk03_detected_new: bool = True) -> Optional[Published]:
    """Published numbers for a label on a dataset, or None. CUHK03 numbers are for the
    detected / new-protocol split only (``cuhk03_detected_new``)."""
    if dataset == "cuhk03" and not cuhk03_detected_new:
        return None
    return PUBLISHED.get((label, dataset))
