"""The engine's evaluation: test.rerank (ours = Torchreid's re_ranking + evaluate_rank on the same
features), test.flip at extraction, test.aqe, the torchreid evaluator, and bad values at the CLI."""
import numpy as np
import pytest
import torch

from conftest import model_for, tiny_setup
from torchreid_ext import build_engine, cli
from torchreid_ext.adapter import torchreid
from torchreid_ext.engines import ReIDEngine
from torchreid_ext.metrics import EvaluationOptions, alpha_query_expansion

MAX_RANK = 50


_EXTRACTED = {}  # (loader, flip) -> the engine's features: the model never changes here


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    """One untrained tiny model and its datamanager; engines are cheap to build around them.
    ``ReIDEngine.extract`` runs once per loader and flip setting (extraction is the slow part on a
    shared CPU), the evaluation after it runs every time."""
    make = tiny_setup(data_root, str(tmp_path_factory.mktemp("eval") / "log"))
    cfg, dm = make()
    torch.manual_seed(0)
    model = model_for(cfg, dm.num_train_pids)
    real_extract = ReIDEngine.extract

    def extract(self, loader, desc, flip=False):
        if (id(loader), flip) not in _EXTRACTED:
            _EXTRACTED[id(loader), flip] = real_extract(self, loader, desc, flip=flip)
        return _EXTRACTED[id(loader), flip]

    def engine(**overrides):
        cfg, _ = make(**overrides)
        eng = build_engine(cfg, dm, model, torch.optim.SGD(model.parameters(), lr=0.01))
        eng.epoch = 0
        eng.set_model_mode("eval")
        return eng

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReIDEngine, "extract", extract)
        engine.real_extract = real_extract
        yield engine


def loaders(engine):
    name = next(iter(engine.test_loader))
    return name, engine.test_loader[name]["query"], engine.test_loader[name]["gallery"]


def features(engine, flip=False):
    _, ql, gl = loaders(engine)
    return engine.extract(ql, "q", flip=flip), engine.extract(gl, "g", flip=flip)


def torchreid_rerank_reference(qf, gf, labels, metric="euclidean", **kwargs):
    """What Torchreid's engine does with test.rerank True (engine.py: _evaluate)."""
    tr = torchreid()
    qg, qq, gg = (tr.metrics.compute_distance_matrix(a, b, metric).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    return tr.metrics.evaluate_rank(tr.utils.re_ranking(qg, qq, gg, **kwargs), *labels, max_rank=MAX_RANK,
                                    use_cython=False)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_rerank_equals_torchreids_rerank_and_evaluator(setup, metric):
    engine = setup(**{"test.rerank": True, "test.dist_metric": metric})
    assert engine.evaluation_options.rerank and engine.evaluation_options.rerank_k1 == 20
    (qf, qp, qc), (gf, gp, gc) = features(engine)
    engine.test(rerank=True, dist_metric=metric)
    res = next(iter(engine.last_results.values()))
    cmc, mAP = torchreid_rerank_reference(qf, gf, (qp, gp, qc, gc), metric)
    assert res["mAP"] == pytest.approx(mAP, abs=1e-3)
    assert res["cmc"] == pytest.approx(list(cmc[:20]), abs=1e-3)
    plain = setup(**{"test.dist_metric": metric})
    plain.test(dist_metric=metric)
    assert next(iter(plain.last_results.values()))["mAP"] != pytest.approx(mAP, abs=1e-4)  # re-ranking ran
    assert len(_EXTRACTED) >= 2  # the features above are the engine's


def test_rerank_keys_and_torchreid_evaluator(setup):
    keys = {"test.rerank": True, "test.rerank_k1": 8, "test.rerank_k2": 3, "test.rerank_lambda": 0.5}
    fast = setup(**keys)
    slow = setup(**keys, **{"test.evaluator": "torchreid"})
    (qf, qp, qc), (gf, gp, gc) = features(fast)
    cmc, mAP = torchreid_rerank_reference(qf, gf, (qp, gp, qc, gc), k1=8, k2=3, lambda_value=0.5)
    for engine in (fast, slow):
        engine.test(rerank=True)
        res = next(iter(engine.last_results.values()))
        assert res["mAP"] == pytest.approx(mAP, abs=1e-3)
        assert res["cmc"] == pytest.approx(list(cmc[:20]), abs=1e-3)
    assert next(iter(slow.last_results.values()))["mINP"] is None


def test_flip_averages_the_mirrored_images(setup):
    engine = setup(**{"test.flip": True})
    _, ql, _ = loaders(engine)
    qf, _, _ = setup.real_extract(engine, ql, "q", flip=True)
    model = engine.model
    with torch.no_grad():
        imgs = torch.cat([b["img"] for b in ql])
        plain = model(imgs).double()
        expected = (plain + model(torch.flip(imgs, dims=[3])).double()) / 2
    np.testing.assert_allclose(qf.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the flip changes the features


def test_flip_and_aqe_reach_the_evaluation(setup, monkeypatch):
    seen = []
    import torchreid_ext.metrics as metrics

    real = metrics.evaluate_test_features

    def spy(qf, gf, *labels_and_options):
        seen.append((qf.clone(), labels_and_options[-1]))
        return real(qf, gf, *labels_and_options)

    monkeypatch.setattr(metrics, "evaluate_test_features", spy)
    engine = setup(**{"test.flip": True, "test.aqe": True, "test.aqe_k": 3, "test.rerank": True})
    engine.test(rerank=True)
    qf, opts = seen[-1]
    assert opts.flip and opts.aqe and opts.aqe_k == 3 and opts.rerank
    (flipped, qp, qc), (gflipped, gp, gc) = features(engine, flip=True)
    torch.testing.assert_close(qf, flipped)
    # the result is that of AQE on the flipped features, then re-ranking
    aq, ag = alpha_query_expansion(flipped, gflipped, k=3)
    cmc, mAP = torchreid_rerank_reference(aq, ag, (qp, gp, qc, gc))
    assert next(iter(engine.last_results.values()))["mAP"] == pytest.approx(mAP, abs=1e-3)


def test_python_api_test_options(setup):
    engine = setup()
    engine.evaluation_options = EvaluationOptions(rerank_k1=8, rerank_k2=2)
    engine.test(rerank=True)
    a = next(iter(engine.last_results.values()))
    engine.evaluation_options = None
    engine.test(rerank=True, rerank_k1=8, rerank_k2=2)  # test() takes the options too
    b = next(iter(engine.last_results.values()))
    assert a["mAP"] == b["mAP"] and a["cmc"] == b["cmc"]
    with pytest.raises(TypeError):
        engine.test(rerank_k9=3)


@pytest.mark.parametrize("overrides, message", [
    ({"test.rerank": True, "test.rerank_k1": 0}, "test.rerank_k1 = 0 must be an integer >= 1"),
    ({"test.rerank_k2": 30}, "test.rerank_k2 = 30 must be an integer in [1, test.rerank_k1 = 20]"),
    ({"test.rerank_lambda": 2}, "test.rerank_lambda = 2.0 must be a number in [0, 1]"),
    ({"test.aqe": True, "test.aqe_k": 0}, "test.aqe_k = 0 must be an integer >= 1"),
])
def test_bad_values_exit_2_before_anything_is_written(tiny, tmp_path, capsys, overrides, message):
    save = tmp_path / "run"
    code = cli.main(tiny(save_dir=str(save), **overrides))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("error: ")
    assert not save.exists()
