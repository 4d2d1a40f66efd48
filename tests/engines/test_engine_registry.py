"""The engine registry: train.engine is a lookup, and an engine registered from outside trains
through scripts/main.py."""
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO, model_for, tiny_opts
from torchreid_ext import build_engine, cli
from torchreid_ext.builders import build_datamanager, build_optimizer
from torchreid_ext.config import ConfigError
from torchreid_ext.engines import ENGINES, ImageMetricEngine, MSGREngine, engine_name, register_engine
from torchreid_ext.run_options import RunOptions

PLUGIN = '''
from torchreid_ext.engines import ImageMetricEngine, register_engine


class HalvedLossEngine(ImageMetricEngine):
    """The metric engine with its loss halved, and a summary key of its own."""

    @classmethod
    def from_options(cls, options, datamanager, model, optimizer, scheduler=None, **common):
        engine = super().from_options(options, datamanager, model, optimizer, scheduler, **common)
        engine.factor = 0.5
        return engine

    def compute_loss_terms(self, outputs, pids):
        loss, summary = super().compute_loss_terms(outputs, pids)
        summary["halved/factor"] = self.factor
        return loss * self.factor, summary


register_engine("halved_loss", HalvedLossEngine)
'''


def test_the_default_engine_follows_msgr_enabled():
    assert engine_name("", msgr_enabled=False) == "metric" and ENGINES.get("metric") is ImageMetricEngine
    assert engine_name("", msgr_enabled=True) == "msgr" and ENGINES.get("msgr") is MSGREngine
    assert engine_name("metric", msgr_enabled=True) == "metric"


def test_registration_rules():
    with pytest.raises(TypeError, match="has no from_options"):
        register_engine("no_from_options", object)
    with pytest.raises(ValueError, match="engine name 'metric' is already registered"):
        register_engine("metric", MSGREngine)
    register_engine("metric", ImageMetricEngine)  # the same class again: harmless


def test_an_unknown_engine_is_one_line_naming_the_registered_ones(data_root, tmp_path, capsys):
    status = cli.main(tiny_opts(data_root, str(tmp_path / "run"), **{"train.engine": "nope"}))
    err = capsys.readouterr().err
    assert status == 2 and "train.engine = 'nope' is not valid; choose one of ['metric', 'msgr'" in err
    with pytest.raises(ConfigError):
        cli.load_run_config(tiny_opts(data_root, str(tmp_path / "run"), **{"train.engine": "nope"}))


def test_an_engine_registered_from_outside_trains_through_scripts_main(data_root, tmp_path):
    (tmp_path / "halved_engine.py").write_text(PLUGIN)
    save = tmp_path / "run"
    env = dict(os.environ, TORCHREID_EXT_PLUGINS="halved_engine", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
    opts = tiny_opts(data_root, str(save), **{"train.engine": "halved_loss", "train.max_epoch": 1,
                                              "train.print_freq": 1})
    proc = subprocess.run([sys.executable, osp.join(REPO, "scripts", "main.py"), *opts], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(glob.glob(str(save / "train.log-*"))[0]).read()
    assert "halved/factor 0.5000" in log  # its forward_backward ran, every printed step
    assert osp.isfile(save / "model" / "model.pth.tar-1") and osp.isfile(save / "metrics.json")


def test_build_engine_looks_the_name_up(data_root, tmp_path):
    class Marked(ImageMetricEngine):
        pass

    register_engine("marked_for_test", Marked)
    try:
        cfg, _ = cli.load_run_config(tiny_opts(data_root, str(tmp_path / "run"), **{"train.engine": "marked_for_test"}))
        options = RunOptions(cfg)
        dm = build_datamanager(options)
        model = model_for(cfg, dm.num_train_pids)
        engine = build_engine(cfg, dm, model, build_optimizer(options, model))
        assert type(engine) is Marked and engine.evaluation_options.rerank_k1 == cfg.test.rerank_k1
    finally:
        ENGINES.unregister("marked_for_test")
