"""Published rank-1 / mAP (%): the one place they are written (docs/methods.md R, G3, S5).

Each :class:`PaperRow` is a row of a published table, with its numbers per dataset. From them come
:data:`PUBLISHED`, the numbers the comparison tables print beside ours (keyed by method label and
dataset), and the tables of docs/methods.md, which :func:`render_tables` writes
(``python tools/published_tables.py``; a test checks the page is current). Configs name the row
they aim at, never its numbers.

A method is identified by what a run records in its ``metrics.json``: model name, loss name and
whether MSGR is on (:data:`METHOD_LABELS`).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

__all__ = ["Published", "PaperRow", "ROWS", "PUBLISHED", "METHOD_LABELS", "method_label", "published_for",
           "render_table", "render_tables"]

Pair = Tuple[Optional[float], Optional[float]]  # (rank-1, mAP), percent; None where not given


class Published(NamedTuple):
    rank1: Optional[float]  # percent; None where the source gives only mAP
    mAP: float  # percent
    source: str


class PaperRow(NamedTuple):
    source: str  # the table, e.g. "MSFL paper Table IV"
    row: str  # the row as our notes name it
    numbers: Mapping[str, Pair]  # Torchreid dataset name -> (rank-1, mAP)
    label: Optional[str] = None  # method label of our runs that this row is the target of


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

T1, T2, T3, T4 = (f"MSFL paper Table {n}" for n in ("I", "II", "III", "IV"))
ZOO = "Torchreid model zoo"
SN = "SN paper (single query)"
_M, _D, _C, _S = "market1501", "dukemtmcreid", "cuhk03", "msmt17"  # cuhk03: detected boxes, new protocol

ROWS: Tuple[PaperRow, ...] = (
    PaperRow(T4, "ResNet-50 (BN-FC(512)-ReLU)", {_M: (90.4, 78.3), _D: (82.9, 70.6), _C: (63.4, 58.3),
                                                  _S: (None, 38.9)}, "R50"),
    PaperRow(T4, "+CSIP", {_M: (91.5, 79.3), _D: (84.1, 74.5), _C: (65.6, 60.4), _S: (69.3, 40.2)}, "R50+CSIP"),
    PaperRow(T4, "+MSFF (= MSFL)", {_M: (92.3, 81.9), _D: (85.7, 75.4), _C: (65.1, 61.2), _S: (70.1, 40.8)},
             "+MSFF (MSFL)"),
    PaperRow(T4, "+MSGR (= MSFL+MSGR)", {_M: (93.7, 83.6), _D: (86.8, 76.9), _C: (67.7, 63.3), _S: (71.3, 45.3)},
             "+MSGR (MSFL+MSGR)"),
    PaperRow(T4, "+re-ranking", {_M: (94.4, 89.5), _D: (89.6, 89.0), _C: (71.3, 68.6), _S: (78.4, 51.7)}),
    PaperRow(T1, "(a) ResNet-50", {_M: (90.4, 78.3)}),
    PaperRow(T1, "(b) direct fuse C4 + C5", {_M: (90.7, 78.6)}),
    PaperRow(T1, "(c) direct fuse C2..C5", {_M: (87.1, 75.9)}),
    PaperRow(T1, "(d) fuse P2..P5 without laterals", {_M: (90.3, 78.3)}),
    PaperRow(T1, "(e) fuse P2..P5 with laterals (CSIP)", {_M: (91.5, 79.8)}),
    PaperRow(T1, "(f) full MSFL", {_M: (92.3, 81.9)}),
    PaperRow(T2, "(a) ResNet-50 baseline, 24.56 M, 2.6 G", {_M: (90.4, 78.3)}),
    PaperRow(T2, "(b) ResNet-50, last stride 1, 24.56 M, 4.1 G", {_M: (91.3, 79.8)}),
    PaperRow(T2, "(c) MSFL (fuse P2..P5), 27 M, 5.9 G", {_M: (92.3, 81.9)}),
    PaperRow(T3, "(a) R50 baseline, no MSGR", {_M: (90.4, 78.3)}),
    PaperRow(T3, "(b) q = 1, eps = 1e-2", {_M: (85.1, 70.1)}),
    PaperRow(T3, "(c) q = 2, eps = 1e-2", {_M: (91.7, 80.1)}, "R50+MSGR"),
    PaperRow(T3, "(d) q = inf, eps = 1e-2", {_M: (88.2, 72.2)}),
    PaperRow(T3, "(e) q = 2, eps = 1e-1", {_M: (90.7, 79.4)}),
    PaperRow(T3, "(f) q = 2, eps = 1e-3", {_M: (91.2, 80.0)}),
    *(PaperRow(T3, f"({r}) stage choice, q = 2, eps = 1e-2", {_M: v})
      for r, v in zip("ghijkl", ((92.1, 80.4), (90.2, 78.3), (92.5, 80.3), (92.7, 80.1), (92.5, 80.1),
                                 (92.4, 79.8)))),
    PaperRow(ZOO, "osnet_x1_0", {_M: (94.2, 82.6), _D: (87.0, 70.2), _S: (74.9, 43.8)}, "OSNet"),
    PaperRow(ZOO, "resnet50", {_M: (87.9, 70.4)}),
    PaperRow(ZOO, "resnet50_fc512", {_M: (90.8, 75.3)}),
    PaperRow(SN, "TriNet (their baseline)", {_M: (84.92, 69.14)}),
    PaperRow(SN, "SN loss", {_M: (88.27, 73.43)}, "R50+SN"),
    PaperRow(SN, "SN loss + re-ranking", {_M: (89.90, 86.16)}),
)

PUBLISHED: Dict[Tuple[str, str], Published] = {
    (r.label, ds): Published(r1, mAP, r.source)
    for r in ROWS if r.label is not None for ds, (r1, mAP) in r.numbers.items()
}

DATASET_TITLES = {_M: "Market-1501", _D: "DukeMTMC-reID", _C: "CUHK03 detected (767/700)", _S: "MSMT17"}


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


def _number(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}" if round(x, 1) == x else f"{x:.2f}"


def render_table(source: str) -> str:
    """The markdown table of one source: a rank-1 and an mAP column for one dataset, else a
    "rank-1 / mAP" column per dataset."""
    rows = [r for r in ROWS if r.source == source]
    if not rows:
        raise KeyError(f"no published table {source!r}; known: {sorted({r.source for r in ROWS})}")
    datasets = [d for d in DATASET_TITLES if any(d in r.numbers for r in rows)]
    if len(datasets) == 1:
        (d,) = datasets
        lines = [f"| row ({DATASET_TITLES[d]}) | rank-1 | mAP |", "| --- | --- | --- |"]
        lines += [f"| {r.row} | {_number(r.numbers[d][0])} | {_number(r.numbers[d][1])} |" for r in rows]
    else:
        lines = ["| row | " + " | ".join(DATASET_TITLES[d] for d in datasets) + " |",
                 "| --- |" + " --- |" * len(datasets)]
        for r in rows:
            cells = [" / ".join(map(_number, r.numbers[d])) if d in r.numbers else "" for d in datasets]
            lines.append(f"| {r.row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_BLOCK = re.compile(r"(<!-- published: (?P<source>[^>]+?) -->\n)(?P<body>.*?)(\n<!-- end published -->)", re.S)


def render_tables(page: str) -> str:
    """``page`` with every ``<!-- published: SOURCE -->`` ... ``<!-- end published -->`` block
    replaced by :func:`render_table` of that source."""
    return _BLOCK.sub(lambda m: m.group(1) + render_table(m.group("source")) + m.group(4), page)
