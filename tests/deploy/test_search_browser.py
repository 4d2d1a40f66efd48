"""Search as a person uses it: the installed ``torchreid-ext-search`` on a folder of generated crops,
twice (the second run reads the gallery from the cache), then report.html opened in headless Chromium:
the rendered page shows one row per query and k matches per row, in the decisions' colours."""
import csv
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_opts
from deploy_fixtures import SUBPROCESS_ENV, checkpoints, one_thread  # noqa: F401
from search_fixtures import make_crops

K = 3
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser():
    """Debian's chromium (``.ci/run`` installs it when missing), or skip with the reason."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser: Debian's 'chromium' is not installed and could not be "
                "(apt-get install -y chromium; .ci/run installs it where apt is available)")


def _chromium(browser, tmp_path, *args):
    """Run headless Chromium with a fresh profile; return its stdout."""
    profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
    proc = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Rows(HTMLParser):
    """Per ``div.query-row`` of a rendered DOM: how many ``figure.match`` and ``img`` with data URIs it holds."""

    def __init__(self):
        super().__init__()
        self.rows, self.depth = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if self.depth:
            if tag == "div":
                self.depth += 1
            if tag == "figure" and "match" in classes:
                self.rows[-1]["matches"] += 1
                self.rows[-1]["decisions"].append(classes[1])
            if tag == "img" and (attrs.get("src") or "").startswith("data:image/jpeg;base64,"):
                self.rows[-1]["images"] += 1
        elif tag == "div" and "query-row" in classes:
            self.rows.append({"matches": 0, "images": 0, "decisions": []})
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth and tag == "div":
            self.depth -= 1


def _command(*argv):
    exe = osp.join(osp.dirname(sys.executable), "torchreid-ext-search")
    assert osp.isfile(exe), "torchreid-ext-search is installed with the package (pip install -e .)"
    return subprocess.run([exe, *map(str, argv)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)


def test_installed_search_csv_json_cache_and_report_in_a_browser(checkpoints, data_root, tmp_path):
    browser = _browser()
    gallery, out, cache = tmp_path / "crops", tmp_path / "results", tmp_path / "cache"
    make_crops(str(gallery), identities=5, per_identity=3, seed=3)
    queries = make_crops(str(tmp_path / "queries"), identities=3, per_identity=1, seed=4)
    argv = ["--weights", checkpoints("osnet_x0_25"), "--query", *queries, "--gallery", gallery, "--out", out,
            "--cache-dir", cache, "-k", K, "--per-page", 2]
    opts = tiny_opts(data_root, str(tmp_path / "log"))

    first = _command(*argv, *opts)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "15 images, none in the cache yet: extracting all" in first.stdout
    # the progress bar (tqdm may clear it before 100% shows)
    assert "gallery features:" in first.stderr and "batch/s" in first.stderr
    with open(out / "matches.json") as f:
        record = json.load(f)
    first_query = [m["distance"] for m in record["matches"][:K]]
    threshold = (first_query[1] + first_query[2]) / 2  # the first query's two best are the same person

    second = _command(*argv, "--threshold", threshold, *opts)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "15 images, all from the cache" in second.stdout and "nothing to extract" in second.stdout
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "matches.json") as f:
        record = json.load(f)
    assert len(rows) == len(record["matches"]) == 3 * K
    assert [r["query"] for r in rows] == [q for q in queries for _ in range(K)]
    assert [int(r["rank"]) for r in rows] == list(range(1, K + 1)) * 3
    assert all(osp.isfile(r["gallery"]) and r["gallery"].startswith(str(gallery)) for r in rows)
    for q in range(3):
        d = [float(r["distance"]) for r in rows[q * K:(q + 1) * K]]
        assert d == sorted(d)
    assert [r["decision"] for r in rows] == ["same" if float(r["distance"]) <= threshold else "different"
                                             for r in rows]
    assert [r["decision"] for r in rows[:K]] == ["same", "same", "different"]
    assert [m["distance"] for m in record["matches"]] == [float(r["distance"]) for r in rows]

    shutil.move(str(gallery), str(tmp_path / "moved"))  # the report embeds its images
    pages = {"report.html": 2, "report-2.html": 1}
    assert sorted(os.listdir(out)) == sorted(["matches.csv", "matches.json", *pages])
    decisions = []
    for page, num_rows in pages.items():
        dom = _chromium(browser, tmp_path, "--dump-dom", (out / page).as_uri())
        parser = _Rows()
        parser.feed(dom)
        assert len(parser.rows) == num_rows, dom[:2000]
        assert [r["matches"] for r in parser.rows] == [K] * num_rows
        assert [r["images"] for r in parser.rows] == [K + 1] * num_rows  # the query and its matches
        decisions += [d for r in parser.rows for d in r["decisions"]]
    assert decisions == [r["decision"] for r in rows]

    shot = tmp_path / "report.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1000,700", (out / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x2e, 0x7d, 0x32), (0xc6, 0x28, 0x28)):  # same: green, different: red borders drawn
        near = (np.abs(pixels - colour).max(axis=1) <= 12).sum()
        assert near >= 200, (colour, near)
