"""Config: upstream keys and defaults, upstream files, typo errors, coercion, inheritance."""
import glob
import os.path as osp

import pytest

from torchreid_ext.config import (
    ConfigError,
    flat_keys,
    get_default_config,
    load_config,
    merge_from_file,
    merge_from_list,
    validate_config,
)

HERE = osp.dirname(__file__)

# Transcribed from upstream Torchreid's scripts/default_config.py (get_default_config).
UPSTREAM_DEFAULTS = {
    "model.name": "resnet50", "model.pretrained": True, "model.load_weights": "", "model.resume": "",
    "data.type": "image", "data.root": "reid-data", "data.sources": ["market1501"],
    "data.targets": ["market1501"], "data.workers": 4, "data.split_id": 0, "data.height": 256,
    "data.width": 128, "data.combineall": False, "data.transforms": ["random_flip"], "data.k_tfm": 1,
    "data.norm_mean": [0.485, 0.456, 0.406], "data.norm_std": [0.229, 0.224, 0.225],
    "data.save_dir": "log", "data.load_train_targets": False,
    "market1501.use_500k_distractors": False, "cuhk03.labeled_images": False,
    "cuhk03.classic_split": False, "cuhk03.use_metric_cuhk03": False,
    "sampler.train_sampler": "RandomSampler", "sampler.train_sampler_t": "RandomSampler",
    "sampler.num_instances": 4, "sampler.num_cams": 1, "sampler.num_datasets": 1,
    "video.seq_len": 15, "video.sample_method": "evenly", "video.pooling_method": "avg",
    "train.optim": "adam", "train.lr": 0.0003, "train.weight_decay": 5e-4, "train.max_epoch": 60,
    "train.start_epoch": 0, "train.batch_size": 32, "train.fixbase_epoch": 0,
    "train.open_layers": ["classifier"], "train.staged_lr": False, "train.new_layers": ["classifier"],
    "train.base_lr_mult": 0.1, "train.lr_scheduler": "single_step", "train.stepsize": [20],
    "train.gamma": 0.1, "train.print_freq": 20, "train.seed": 1,
    "sgd.momentum": 0.9, "sgd.dampening": 0.0, "sgd.nesterov": False, "rmsprop.alpha": 0.99,
    "adam.beta1": 0.9, "adam.beta2": 0.999,
    "loss.name": "softmax", "loss.softmax.label_smooth": True, "loss.triplet.margin": 0.3,
    "loss.triplet.weight_t": 1.0, "loss.triplet.weight_x": 0.0,
    "test.batch_size": 100, "test.dist_metric": "euclidean", "test.normalize_feature": False,
    "test.ranks": [1, 5, 10, 20], "test.evaluate": False, "test.eval_freq": -1, "test.start_eval": 0,
    "test.rerank": False, "test.visrank": False, "test.visrank_topk": 10,
}


def get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_upstream_key_has_upstream_default():
    cfg = get_default_config()
    keys = set(flat_keys(cfg))
    for key, value in UPSTREAM_DEFAULTS.items():
        assert key in keys, key
        assert get(cfg, key) == value, key
        assert type(get(cfg, key)) is type(value), key


@pytest.mark.parametrize("path", sorted(glob.glob(osp.join(HERE, "fixtures", "upstream_configs", "*.yaml"))))
def test_upstream_config_files_load_unchanged(path):
    cfg = load_config(path)
    assert cfg.train.optim == "amsgrad" and cfg.train.lr == 0.0015
    assert cfg.test.batch_size == 300 and cfg.train.fixbase_epoch == 10


def test_misspelt_key_in_file_names_key_and_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(str(p))


def test_misspelt_section_and_override_suggest_closest():
    cfg = get_default_config()
    with pytest.raises(ConfigError, match=r"'modle\.name'.*'model\.name'"):
        merge_from_list(cfg, ["modle.name", "x"])
    with pytest.raises(ConfigError, match=r"'msgr\.epss'.*'msgr\.eps'"):
        merge_from_list(cfg, ["msgr.epss", "0.1"])


def test_coercion_and_type_errors(tmp_path):
    cfg = get_default_config()
    merge_from_list(cfg, ["train.lr", "1", "msgr.q", "inf", "msgr.eps", "0.1", "data.sources", "synthreid",
                          "data.save_dir", "123", "train.max_epoch", "3"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.msgr.q == float("inf")
    assert cfg.msgr.eps == [0.1]
    assert cfg.data.sources == ["synthreid"]
    assert cfg.data.save_dir == "123"
    with pytest.raises(ConfigError, match=r"train\.max_epoch.*expects int"):
        merge_from_list(cfg, ["train.max_epoch", "2.5"])
    with pytest.raises(ConfigError, match="odd number"):
        merge_from_list(cfg, ["train.lr"])


def test_base_inheritance_and_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  max_epoch: 7\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.train.lr == 0.25 and cfg.train.max_epoch == 7
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize(
    "opts, pattern",
    [
        (["loss.name", "arcface"], r"loss\.name = 'arcface'.*softmax.*triplet.*drsl.*sn"),
        (["train.amp", "fp8"], r"train\.amp.*none.*fp16.*bf16"),
        (["msgr.q", "0.5"], r"msgr\.q = 0\.5 is not valid; q is a norm order >= 1"),
        (["sampler.train_sampler", "RandomIdentitySampler", "train.batch_size", "30"],
         r"batch_size = 30 is not divisible by sampler\.num_instances = 4"),
        (["msgr.enabled", "True", "msgr.eps", "[0.1, 0.2, 0.3]"], r"msgr\.eps has 3 values for 2 stages"),
        (["loss.name", "triplet", "train.fixbase_epoch", "2"], r"no cross-entropy term"),
        (["data.transforms", "[random_flip, random_rotate]"], r"unknown entries \['random_rotate'\].*random_crop"),
        (["test.visrank", "True"], r"test\.visrank = True draws rank lists of an evaluation-only run; set "
                                   r"test\.evaluate True"),
    ],
)
def test_invalid_values_fail_with_allowed_values(opts, pattern):
    cfg = get_default_config()
    merge_from_list(cfg, opts)
    with pytest.raises(ConfigError, match=pattern):
        validate_config(cfg)


def test_repo_configs_load():
    root = osp.dirname(HERE)
    paths = sorted(glob.glob(osp.join(root, "configs", "**", "*.yaml"), recursive=True))
    assert any(p.endswith("quickstart.yaml") for p in paths)
    for path in paths:
        cfg = get_default_config()
        merge_from_file(cfg, path)
        validate_config(cfg)


# ------------------------------------------------------------------ misspelt sections (issue 19)

def test_misspelt_section_suggests_the_section(tmp_path):
    (tmp_path / "modle.yaml").write_text("modle:\n  name: osnet_x0_25\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'modle' in .*; did you mean 'model'\?"):
        load_config(str(tmp_path / "modle.yaml"))
    # a misspelt section is a section: the hint is 'train', never a key such as 'train.lr'
    (tmp_path / "trian.yaml").write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'trian' in .*; did you mean 'train'\?$"):
        load_config(str(tmp_path / "trian.yaml"))
    with pytest.raises(ConfigError, match=r"Unknown config key 'trian\.lr' on the command line; "
                                          r"did you mean 'train\.lr'\?$"):
        load_config(None, ["trian.lr", "0.1"])
    # a misspelt key below a section still gets a key
    (tmp_path / "lrr.yaml").write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'\?$"):
        load_config(str(tmp_path / "lrr.yaml"))


# ------------------------------------------------------------------ bad values: exit 2, nothing written

def run_cli(argv, capsys):
    from torchreid_ext import cli

    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"data.height": 0}, "data.height = 0 is not valid; the input image height must be >= 1 pixel"),
    ({"data.height": -5}, "data.height = -5 is not valid"),
    ({"data.width": 0}, "data.width = 0 is not valid; the input image width must be >= 1 pixel"),
    ({"train.lr": -1}, "train.lr = -1.0 is not valid; the learning rate must be >= 0"),
    ({"msgr.eps": "[-1]"}, "msgr.eps = [-1] is not valid; every eps must be a number >= 0 (checked whether or "
                           "not msgr.enabled)"),
    ({"loss.name": "sn", "loss.sn.k": 1000},
     "train.batch_size = 16 is too small: the Support Neighbor loss needs batch_size - 1 >= k + 1 "
     "(loss.sn.k = 1000), i.e. a batch of at least 1002 images"),
    ({"test.ranks": "[0,1]"}, "test.ranks = [0, 1] is not valid; ranks are integers >= 1"),
    ({"sampler.num_instances": 0}, "sampler.num_instances = 0 is not valid; it must be >= 1"),
    ({"loss.name": "drsl", "loss.drsl.weight": -1}, "loss.drsl.weight = -1.0 must be >= 0"),
    ({"loss.name": "drsl", "loss.drsl.weight": 0, "loss.drsl.weight_x": 0},
     "no loss term has a positive weight (loss.drsl.weight = 0.0, loss.drsl.weight_x = 0.0, "
     "loss.drsl.weight_t = 0.0)"),
    ({"loss.drsl.tau_rel": 0}, "loss.drsl: DRSL: tau_rel must be > 0, got 0.0"),
    ({"loss.name": "triplet", "sampler.train_sampler": "RandomSampler"},
     "sampler.train_sampler RandomIdentitySampler"),
])
def test_bad_value_exits_2_with_one_line_before_anything_is_written(tiny, tmp_path, capsys, overrides, message):
    save = tmp_path / "run"
    code, err = run_cli(tiny(save_dir=str(save), **overrides), capsys)
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not save.exists()


def test_non_string_base_exits_2(tiny, tmp_path, capsys):
    for base in ("5", "[base.yaml, 7]"):
        (tmp_path / "bad.yaml").write_text(f"_BASE_: {base}\n")
        save = tmp_path / "run"
        code, err = run_cli(["--config", str(tmp_path / "bad.yaml")] + tiny(save_dir=str(save)), capsys)
        assert code == 2 and err.count("\n") == 1
        assert "_BASE_ in '" in err and "must be a file path or a list of paths (relative to the file)" in err
        assert not save.exists()


# ------------------------------------------------------------------ sampler guard (issue 14)

@pytest.mark.parametrize("loss", ["triplet", "drsl", "sn"])
@pytest.mark.parametrize("sampler", ["RandomSampler", "SequentialSampler", "RandomDomainSampler"])
def test_ranking_loss_without_identity_batches_is_refused(loss, sampler):
    opts = ["loss.name", loss, "sampler.train_sampler", sampler]
    with pytest.raises(ConfigError, match=rf"loss\.name = '{loss}' trains ranking term.*sampler\.train_sampler = "
                                          rf"'{sampler}' does not put them there.*sampler\.train_sampler "
                                          r"RandomIdentitySampler.*sampler\.allow_batches_without_positives True"):
        load_config(None, opts)
    cfg = load_config(None, opts + ["sampler.allow_batches_without_positives", "True"])  # opted in
    assert cfg.sampler.train_sampler == sampler
    load_config(None, ["loss.name", loss, "sampler.train_sampler", "RandomIdentitySampler"])


def test_sampler_guard_follows_the_active_terms():
    load_config(None, ["loss.name", "softmax"])  # upstream's default: RandomSampler + cross-entropy
    # DRSL's own term off and no triplet term: cross-entropy alone needs no positives
    load_config(None, ["loss.name", "drsl", "loss.drsl.weight", "0"])
    with pytest.raises(ConfigError, match=r"ranking term\(s\) \['triplet'\]"):
        load_config(None, ["loss.name", "drsl", "loss.drsl.weight", "0", "loss.drsl.weight_t", "1"])


def test_upstream_softmax_recipe_with_drsl_is_refused():
    """Issue 14: upstream's im_osnet_x1_0_softmax_256x128_amsgrad.yaml (RandomSampler) with loss.name
    drsl silently skipped about half of the anchors."""
    path = osp.join(HERE, "fixtures", "upstream_configs", "im_osnet_x1_0_softmax_256x128_amsgrad.yaml")
    assert load_config(path).sampler.train_sampler == "RandomSampler"
    with pytest.raises(ConfigError, match=r"'RandomSampler' does not put them there"):
        load_config(path, ["loss.name", "drsl"])
