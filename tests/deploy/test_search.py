"""Search of a folder of crops: top-k equal to brute force, decisions, outputs, the gallery cache, and
every bad input refused (exit 2, one line, before extraction, nothing written)."""
import csv
import json
import os
import os.path as osp
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_opts
from deploy_fixtures import checkpoints, deploy_cfg, listing, one_thread, reference_model  # noqa: F401
from search_fixtures import brute_force, direct_features, make_crops
from torchreid_ext.deploy import extract_features, save_features
from torchreid_ext.deploy import search as search_module
from torchreid_ext.deploy.commands import search_main
from torchreid_ext.deploy.saved_features import FeatureSet
from torchreid_ext.deploy.search import decide, search, top_matches
from torchreid_ext.metrics import EvaluationOptions, alpha_query_expansion


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A gallery folder of 12 generated crops (nested) and a query folder of 2 others."""
    root = tmp_path_factory.mktemp("crops")
    gallery = make_crops(str(root / "gallery"), identities=4, per_identity=3, seed=1)
    query = make_crops(str(root / "query"), identities=2, per_identity=1, seed=2)
    return root, gallery, query


@pytest.fixture
def env(crops, checkpoints, data_root, tmp_path):
    root, gallery, query = crops
    weights = checkpoints("osnet_x0_25")
    return {"root": root, "gallery": gallery, "query": query, "weights": weights, "tmp": tmp_path,
            "cache": str(tmp_path / "cache"), "out": str(tmp_path / "out"),
            "opts": tiny_opts(data_root, str(tmp_path / "log")),
            "cfg": deploy_cfg(data_root, str(tmp_path / "log")),
            "model": reference_model("osnet_x0_25", weights)}


def _search(env, **kwargs):
    args = {"weights": env["weights"], "k": 4, "cache_dir": env["cache"], "progress": False, **kwargs}
    queries = args.pop("queries", [str(env["root"] / "query")])
    gallery = args.pop("gallery", str(env["root"] / "gallery"))
    return search(env["cfg"], queries, gallery, args.pop("out", env["out"]), **args)


def _argv(env, *args, gallery=None, query=None):
    return ["--weights", env["weights"], "--query", *(query or [str(env["root"] / "query")]),
            "--gallery", gallery or str(env["root"] / "gallery"), "--out", env["out"], "--cache-dir", env["cache"],
            *args, *env["opts"]]


# ------------------------------------------------------------------ ranking and decisions

def test_decisions_at_the_threshold():
    assert decide(0.5, 0.5) == "same" and decide(0.5000001, 0.5) == "different"
    assert decide(0.0, None) == "not decided"


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
@pytest.mark.parametrize("metric,normalize", [("euclidean", False), ("cosine", False), ("euclidean", True)])
def test_top_matches_equal_brute_force(metric, normalize, backend):
    from torchreid_ext.metrics.knn_index import KNNOptions, faiss_available

    if backend != "exact" and not faiss_available():
        pytest.skip("faiss is not installed (pip install -e '.[faiss]')")
    rng = np.random.default_rng(0)
    qf, gf = rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    opts = EvaluationOptions(dist_metric=metric, normalize_feature=normalize)
    exclude = np.array([-1, 3, -1, 39, -1, -1, 0])
    d, i, plain = top_matches(qf, gf, 5, opts, KNNOptions(backend=backend), exclude)
    assert plain is d  # no re-ranking: the ranked distances are the plain ones
    q64, g64 = qf.astype(np.float64), gf.astype(np.float64)
    if normalize or metric == "cosine":
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        g64 /= np.linalg.norm(g64, axis=1, keepdims=True)
    if metric == "cosine":
        ref = 1 - q64 @ g64.T
        ref[np.arange(7)[exclude >= 0], exclude[exclude >= 0]] = np.inf
        ref_i = np.argsort(ref, axis=1, kind="stable")[:, :5]
        ref_d = np.take_along_axis(ref, ref_i, 1)
    else:
        ref_d, ref_i = brute_force(q64, g64, 5, exclude)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    assert not any(g in row for g, row in zip(exclude, i) if g >= 0)


def test_an_approximate_index_that_finds_too_few_is_completed_exactly():
    """IVF with one probed cell of a few items finds fewer than k: those queries are searched exactly."""
    from torchreid_ext.metrics.knn_index import KNNOptions, faiss_available

    if not faiss_available():
        pytest.skip("faiss is not installed (pip install -e '.[faiss]')")
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 4)) * 10
    gf = (centres.repeat(50, 0) + rng.normal(size=(400, 4))).astype(np.float32)  # 8 tight clusters of 50
    qf = gf[::50] + 0.01
    ivf = KNNOptions(backend="faiss-ivf", ivf_nlist=8, ivf_nprobe=1)
    d, i, _ = top_matches(qf, gf, 60, EvaluationOptions(), ivf)  # a cell holds 50 < 60
    ref_d, ref_i = brute_force(qf.astype(np.float64), gf.astype(np.float64), 60)
    assert (i >= 0).all()
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-2)  # float32 |q|^2 + |g|^2 - 2 q.g vs float64
    assert all(set(a) == set(b) for a, b in zip(i, ref_i))


def test_top_matches_with_aqe_and_reranking_equal_their_references():
    """AQE: brute force after the expansion; re-ranking: Torchreid's own re_ranking on full matrices."""
    from torchreid_ext.adapter import torchreid
    from torchreid_ext.metrics.knn_index import KNNOptions

    rng = np.random.default_rng(1)
    qf, gf = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    aqe = EvaluationOptions(aqe=True, aqe_k=3)
    d, i, _ = top_matches(qf, gf, 4, aqe, KNNOptions())
    q2, g2 = alpha_query_expansion(torch.from_numpy(qf).double(), torch.from_numpy(gf).double(), k=3)
    ref_d, ref_i = brute_force(q2.numpy(), g2.numpy(), 4)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-4)

    rr = EvaluationOptions(rerank=True, rerank_k1=6, rerank_k2=3)
    d, i, plain = top_matches(qf, gf, 4, rr, KNNOptions(), exclude=[2, -1, -1, -1, -1])
    q64, g64 = qf.astype(np.float64), gf.astype(np.float64)
    sq = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    full = torchreid().utils.re_ranking(sq(q64, g64), sq(q64, q64), sq(g64, g64), k1=6, k2=3, lambda_value=0.3)
    full[0, 2] = np.inf
    ref_i = np.argsort(full, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, np.take_along_axis(full, ref_i, 1), rtol=1e-4, atol=1e-5)
    assert 2 not in i[0]
    # decisions use the same pairs' distances before re-ranking
    np.testing.assert_allclose(plain, np.take_along_axis(sq(q64, g64), ref_i, 1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the search

def test_search_matches_brute_force_and_writes_csv_json_report(env):
    g = sorted(env["gallery"])
    qf, gf = direct_features(env["model"], env["query"]), direct_features(env["model"], g)
    ref_d, ref_i = brute_force(qf, gf, 4)
    limit = float(np.median(ref_d))
    res = _search(env, threshold=limit)
    assert [m.query for m in res.matches] == [q for q in env["query"] for _ in range(4)]
    assert [m.rank for m in res.matches] == [1, 2, 3, 4] * 2
    assert [m.gallery for m in res.matches] == [g[j] for j in ref_i.ravel()]
    np.testing.assert_allclose([m.distance for m in res.matches], ref_d.ravel(), rtol=1e-4, atol=1e-3)
    assert [m.decision for m in res.matches] == ["same" if d <= limit else "different" for d in ref_d.ravel()]
    assert {m.decision for m in res.matches} == {"same", "different"}  # the threshold splits them here

    with open(osp.join(env["out"], "matches.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["query"], int(r["rank"]), r["gallery"], float(r["distance"]), r["decision"]) for r in rows] == \
        [tuple(m) for m in res.matches]
    with open(osp.join(env["out"], "matches.json")) as f:
        record = json.load(f)
    assert record["threshold"] == limit and record["k"] == 4 and record["num_gallery"] == 12
    assert [tuple(r.values()) for r in record["matches"]] == [tuple(m) for m in res.matches]
    html = open(osp.join(env["out"], "report.html"), encoding="utf-8").read()
    assert html.count('class="query-row"') == 2 and html.count('<figure class="match ') == 8
    assert "file://" not in html and html.count("data:image/jpeg;base64,") == 10  # self-contained


def test_query_file_inside_the_gallery_is_not_its_own_match(env):
    target = sorted(env["gallery"])[5]
    res = _search(env, queries=[target], k=11)  # 12 images, 11 others
    assert len(res.matches) == 11 and target not in [m.gallery for m in res.matches]
    assert {m.decision for m in res.matches} == {"not decided"}


def test_features_file_gallery_gives_the_folder_search(env):
    folder = _search(env, cache_dir=None)
    h5 = str(env["tmp"] / "g.h5")
    extract_features(env["cfg"], h5, images=str(env["root"] / "gallery"), weights=env["weights"], progress=False)
    from_file = _search(env, gallery=h5, out=str(env["tmp"] / "out2"))
    assert [m[:3] for m in from_file.matches] == [m[:3] for m in folder.matches]
    np.testing.assert_allclose([m.distance for m in from_file.matches], [m.distance for m in folder.matches],
                               rtol=1e-6)


def test_torchreid_model_zoo_file_as_weights(env, tmp_path):
    """A model-zoo file is a bare state dict (here with DataParallel's 'module.' prefix)."""
    from collections import OrderedDict

    from torchreid_ext.checkpoint import load_checkpoint

    state = load_checkpoint(env["weights"])["state_dict"]
    zoo = str(tmp_path / "osnet_x0_25_zoo.pth")
    torch.save(OrderedDict(("module." + k, v) for k, v in state.items()), zoo)
    ours = _search(env, cache_dir=None)
    theirs = _search(env, weights=zoo, cache_dir=None, out=str(tmp_path / "zoo"))
    assert theirs.matches == ours.matches


def test_report_pages_after_per_page_queries(env):
    queries = sorted(env["gallery"])[:5]
    res = _search(env, queries=queries, k=2, per_page=2, cache_dir=None)
    assert [osp.basename(p) for p in res.files] == ["matches.csv", "matches.json", "report.html", "report-2.html",
                                                    "report-3.html"]
    counts = [open(p, encoding="utf-8").read().count('class="query-row"') for p in res.files[2:]]
    assert counts == [2, 2, 1]
    assert 'href="report-2.html"' in open(res.files[2], encoding="utf-8").read()
    # a later search with fewer pages removes the pages it no longer writes
    _search(env, queries=queries[:1], k=2, per_page=2, cache_dir=None)
    assert sorted(os.listdir(env["out"])) == ["matches.csv", "matches.json", "report.html"]


def test_thumbnails_are_at_most_128_pixels_high(tmp_path):
    import base64
    import io

    from torchreid_ext.deploy.report import thumbnail_uri

    big, small = str(tmp_path / "big.png"), str(tmp_path / "small.png")
    Image.new("RGB", (150, 600), (10, 200, 30)).save(big)
    Image.new("RGB", (20, 40), (10, 200, 30)).save(small)
    sizes = [Image.open(io.BytesIO(base64.b64decode(thumbnail_uri(p).split(",", 1)[1]))).size for p in (big, small)]
    assert sizes == [(32, 128), (20, 40)]  # scaled down, never up
    assert thumbnail_uri(str(tmp_path / "gone.png")) is None


# ------------------------------------------------------------------ the cache

def _count_extractions(monkeypatch):
    """Record ``(desc, number of images)`` of every extraction the search runs."""
    calls = []
    real = search_module.image_features

    def counting(cfg, model, image_set, device, progress=True, desc="features"):
        calls.append((desc, len(image_set.paths)))
        return real(cfg, model, image_set, device, progress, desc)

    monkeypatch.setattr(search_module, "image_features", counting)
    return calls


def test_second_search_extracts_nothing_and_a_changed_file_is_extracted_again(env, monkeypatch, capsys, tmp_path):
    import shutil

    gallery = str(tmp_path / "g")
    shutil.copytree(env["root"] / "gallery", gallery)
    calls = _count_extractions(monkeypatch)
    first = _search(env, gallery=gallery)
    assert calls == [("query features", 2), ("gallery features", 12)] and first.cached == 0
    calls.clear()
    capsys.readouterr()
    second = _search(env, gallery=gallery)
    assert calls == [("query features", 2)] and second.extracted == [] and second.cached == 12
    assert second.matches == first.matches
    assert "all from the cache" in capsys.readouterr().out

    changed = sorted(os.path.join(r, n) for r, _, ns in os.walk(gallery) for n in ns)[4]
    Image.open(changed).transpose(Image.FLIP_TOP_BOTTOM).save(changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10 ** 9))
    calls.clear()
    capsys.readouterr()
    third = _search(env, gallery=gallery)
    assert calls == [("query features", 2), ("gallery features", 1)]
    assert third.extracted == [changed] and third.changed == [changed] and third.cached == 11
    out = capsys.readouterr().out
    assert "1 changed since the cached extraction, extracted again: " + osp.relpath(changed, gallery) in out
    fresh = _search(env, gallery=gallery, cache_dir=None, out=str(tmp_path / "fresh"))
    assert [m[:3] for m in third.matches] == [m[:3] for m in fresh.matches]
    # the changed file alone in a batch: its features differ from a batch of 12 by float32 rounding
    np.testing.assert_allclose([m.distance for m in third.matches], [m.distance for m in fresh.matches], rtol=1e-4)

    os.remove(sorted(os.path.join(r, n) for r, _, ns in os.walk(gallery) for n in ns)[0])
    make_crops(osp.join(gallery, "new"), identities=1, per_identity=2, seed=9)
    calls.clear()
    capsys.readouterr()
    fourth = _search(env, gallery=gallery)
    assert calls == [("query features", 2), ("gallery features", 2)] and fourth.num_gallery == 13
    out = capsys.readouterr().out
    assert "2 new, extracted" in out and "1 gone from the folder, dropped" in out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_corrupt_cache_entry_is_ignored_with_a_warning_and_rebuilt(env, monkeypatch, capsys, damage):
    first = _search(env)
    (entry,) = [osp.join(env["cache"], n) for n in os.listdir(env["cache"])]
    data = bytearray(open(entry, "rb").read())
    if damage == "garbage":
        data = bytearray(b"not a cache entry" * 10)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # one bit of the stored features (np.savez stores uncompressed: the zip stays readable)
        offset = data.index(b"features.npy") + 200
        data[offset] ^= 0x10
    with open(entry, "wb") as f:
        f.write(data)
    calls = _count_extractions(monkeypatch)
    capsys.readouterr()
    again = _search(env)
    out = capsys.readouterr().out
    assert "is damaged" in out and "ignored and rebuilt" in out
    assert calls == [("query features", 2), ("gallery features", 12)]
    assert again.matches == first.matches
    calls.clear()
    _search(env)  # rebuilt: whole again
    assert calls == [("query features", 2)]


# ------------------------------------------------------------------ calibrated decisions

@pytest.fixture(scope="module")
def calibration(checkpoints, data_root, tmp_path_factory):
    """metrics.json of torchreid-ext-evaluate on synthreid_small's labelled query / gallery, extracted
    with the search tests' weights: it records verification thresholds."""
    from torchreid_ext.deploy import evaluate_files

    folder = tmp_path_factory.mktemp("calibration")
    cfg = deploy_cfg(data_root, str(folder / "log"))
    for split in ("query", "gallery"):
        extract_features(cfg, str(folder / f"{split}.h5"), dataset="synthreid_small", split=split,
                         weights=checkpoints("osnet_x0_25"), progress=False)
    record = evaluate_files(str(folder / "query.h5"), str(folder / "gallery.h5"), out_dir=str(folder))
    return record["metrics_file"]


def test_calibrated_threshold_decides_on_the_distances(env, calibration, capsys):
    with open(calibration) as f:
        recorded = json.load(f)["results"]["verification"]["at_fpr"]
    for fpr in ("0.01", "0.001"):
        assert search_main(_argv(env, "--calibration", calibration, "--fpr", fpr, "-k", "12")) == 0
        with open(osp.join(env["out"], "matches.json")) as f:
            record = json.load(f)
        threshold = recorded[fpr]["threshold"]
        assert record["threshold"] == threshold and record["fpr"] == float(fpr)
        assert [m["decision"] for m in record["matches"]] == \
            ["same" if m["distance"] <= threshold else "different" for m in record["matches"]]


def test_calibration_of_another_kind_of_distance_is_refused(env, calibration, capsys, monkeypatch):
    _fails(env, _argv(env, "--calibration", calibration, "test.normalize_feature", "True"), capsys, monkeypatch,
           "test.normalize_feature = False", "this search uses True")
    _fails(env, _argv(env, "--calibration", calibration, "test.dist_metric", "cosine"), capsys, monkeypatch,
           "test.dist_metric = euclidean")


def test_reranked_search_decides_on_plain_distances(env, tmp_path):
    cfg = env["cfg"].clone()
    cfg.defrost()
    cfg.test.rerank, cfg.test.rerank_k1, cfg.test.rerank_k2 = True, 4, 2
    plain = _search(env, k=5, cache_dir=None)
    limit = float(np.median([m.distance for m in plain.matches]))
    res = search(cfg, [str(env["root"] / "query")], str(env["root"] / "gallery"), str(tmp_path / "rr"),
                 weights=env["weights"], k=5, threshold=limit, cache_dir=None, progress=False)
    with open(tmp_path / "rr" / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["query", "rank", "gallery", "distance", "decision", "distance_before_rerank"]
    gallery = sorted(env["gallery"])
    qf, gf = direct_features(env["model"], env["query"]), direct_features(env["model"], gallery)
    for row, m in zip(rows, res.matches):
        q, g = env["query"].index(row["query"]), gallery.index(row["gallery"])
        before = ((qf[q] - gf[g]) ** 2).sum()
        assert float(row["distance_before_rerank"]) == pytest.approx(before, rel=1e-4, abs=1e-6)
        assert row["decision"] == m.decision == ("same" if float(row["distance_before_rerank"]) <= limit
                                                 else "different")
    assert [float(r["distance"]) for r in rows[:5]] == sorted(float(r["distance"]) for r in rows[:5])


# ------------------------------------------------------------------ the command line

def test_command_line_with_threshold(env, capsys):
    assert search_main(_argv(env, "-k", "3", "--threshold", "1e9")) == 0
    out = capsys.readouterr().out
    assert "Searched 12 gallery images for 2 queries: 6 same" in out
    assert osp.isfile(osp.join(env["out"], "report.html"))


def _png_declaring(path, width, height):
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return str(path)


def _fails(env, argv, capsys, monkeypatch, *needles):
    """Exit 2 with one error line naming the needles, before any model is built; nothing written."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(search_module, "eval_model", no_model)
    cache_before = listing(env["cache"]) if osp.isdir(env["cache"]) else None
    try:
        rc = search_main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert not osp.exists(env["out"]) or listing(env["out"]) == []
    assert (listing(env["cache"]) if osp.isdir(env["cache"]) else None) == cache_before
    return lines[0]


def test_empty_query_or_gallery_folder(env, capsys, monkeypatch):
    empty = env["tmp"] / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    _fails(env, _argv(env, query=[str(empty)]), capsys, monkeypatch, "holds no image files", str(empty))
    _fails(env, _argv(env, gallery=str(empty)), capsys, monkeypatch, "holds no image files", str(empty))


def test_non_image_and_over_size_files(env, capsys, monkeypatch):
    text = env["tmp"] / "notes.txt"
    text.write_text("not an image")
    _fails(env, _argv(env, query=[str(text)]), capsys, monkeypatch, "is not an image file", "notes.txt")
    fake = env["tmp"] / "fake.jpg"
    fake.write_text("not an image either")
    _fails(env, _argv(env, query=[str(fake)]), capsys, monkeypatch, "cannot read image file", "fake.jpg")
    bomb = _png_declaring(env["tmp"] / "bomb.png", 60000, 60000)
    _fails(env, _argv(env, query=[bomb]), capsys, monkeypatch, "bomb.png", "60000x60000", "data.max_image_side")
    wide = env["tmp"] / "wide.png"
    Image.new("RGB", (200, 20)).save(wide)
    _fails(env, _argv(env, "data.max_image_side", "128", query=[str(wide)]), capsys, monkeypatch,
           "wide.png", "200x20", "data.max_image_side = 128")
    # in the gallery: found among the files to extract
    gallery = env["tmp"] / "g"
    make_crops(str(gallery), identities=2, per_identity=2)
    _png_declaring(gallery / "cam0" / "zz_bomb.png", 5000, 5000)
    _fails(env, _argv(env, gallery=str(gallery)), capsys, monkeypatch, "zz_bomb.png", "5000x5000",
           "data.max_image_side = 4096")


def test_k_zero_or_larger_than_the_gallery(env, capsys, monkeypatch):
    _fails(env, _argv(env, "-k", "0"), capsys, monkeypatch, "k = 0", ">= 1")
    _fails(env, _argv(env, "-k", "13"), capsys, monkeypatch, "k = 13", "holds 12 image(s)", "k <= 12")
    inside = sorted(env["gallery"])[0]
    _fails(env, _argv(env, "-k", "12", query=[inside]), capsys, monkeypatch, "k = 12", "11 image(s) other than "
           "the query itself")


def test_features_file_from_another_model_or_input_size(env, capsys, monkeypatch):
    paths = sorted(env["gallery"])
    for name, meta, needles in [
        ("model", {"model_name": "resnet50"}, ("extracted by model 'resnet50'", "model.name = 'osnet_x0_25'")),
        ("size", {"height": 128, "width": 64}, ("extracted at 128x64", "data.height x data.width = 64x32")),
        ("flip", {"flip": True}, ("extracted with test.flip = True", "set test.flip True")),
        ("weights", {"weights_sha256": "0" * 64, "weights": "other.pth"}, ("other weights ('other.pth'",)),
    ]:
        fs = FeatureSet(features=np.zeros((len(paths), 512), np.float32), paths=paths,
                        model_name=meta.pop("model_name", "osnet_x0_25"),
                        meta={"height": 64, "width": 32, "flip": False, **meta})
        h5 = save_features(fs, str(env["tmp"] / f"{name}.h5"))
        _fails(env, _argv(env, gallery=h5), capsys, monkeypatch, *needles)


def test_threshold_arguments(env, capsys, monkeypatch):
    _fails(env, _argv(env, "--threshold", "-1"), capsys, monkeypatch, "threshold = -1.0", ">= 0")
    _fails(env, _argv(env, "--threshold", "nan"), capsys, monkeypatch, "threshold = nan")
    _fails(env, _argv(env, "--fpr", "0.01"), capsys, monkeypatch, "calibration file")
    metrics = env["tmp"] / "metrics.json"
    metrics.write_text(json.dumps({"kind": "saved_features_evaluation", "results": {"mAP": 0.5, "rank1": 0.6}}))
    _fails(env, _argv(env, "--calibration", str(metrics)), capsys, monkeypatch, "metrics.json")
    _fails(env, _argv(env, "--calibration", str(env["tmp"] / "nope.json")), capsys, monkeypatch, "nope.json",
           "does not exist")


@pytest.mark.parametrize("fpr", ["0", "1", "1.5", "-0.1"])
def test_fpr_outside_0_1(env, capsys, monkeypatch, fpr, calibration):
    _fails(env, _argv(env, "--calibration", calibration, "--fpr", fpr), capsys, monkeypatch,
           f"fpr = {float(fpr)}", "(0, 1)")


def test_cache_folder_under_a_file(env, capsys, monkeypatch):
    blocker = env["tmp"] / "file"
    blocker.write_text("x")
    _fails(env, _argv(env, "--cache-dir", str(blocker / "c")), capsys, monkeypatch, "cache folder", "is a file")


def test_unwritable_cache_folder(env, capsys, monkeypatch):
    from readonly import read_only

    os.makedirs(env["cache"])
    with read_only(env["cache"]):
        _fails(env, _argv(env), capsys, monkeypatch, "cache folder", env["cache"], "cannot be written")
