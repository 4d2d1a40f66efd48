"""Each component owns its options: every owned config key, its default and its allowed values are
declared once, in the component's options dataclass, and the config follows it."""
import dataclasses

import pytest

from torchreid_ext.config import OWNERS, ConfigError, get_default_config, validate_config
from torchreid_ext.msgr import MSGROptions
from torchreid_ext.msgr.step import check_mode
from torchreid_ext.options import config_value

CHOICE_KEYS = [(owner, name) for owner in OWNERS for name in owner.CHOICES]


def test_every_owned_key_is_in_the_default_config_with_the_dataclass_default():
    cfg = get_default_config()
    owned = {}
    for owner in OWNERS:
        for key, default in owner.config_defaults().items():
            assert key not in owned, f"{key} is owned by {owned.get(key)} and {owner.__name__}"
            owned[key] = owner.__name__
            assert config_value(cfg, key) == default, key
    assert len(owned) >= 30  # msgr, dist, model.msfl, our test / train / data keys


@pytest.mark.parametrize("owner, name", CHOICE_KEYS, ids=[f"{o.__name__}.{n}" for o, n in CHOICE_KEYS])
def test_changing_an_allowed_value_set_in_the_dataclass_changes_the_config_validation(owner, name, monkeypatch):
    key = owner.key_of(name)
    cfg = get_default_config()
    node, leaf = cfg, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = "zz_new_value"
    with pytest.raises(ConfigError, match=rf"{key} = 'zz_new_value' is not valid; choose one of"):
        validate_config(cfg)
    monkeypatch.setitem(owner.CHOICES, name, tuple(owner.CHOICES[name]) + ("zz_new_value",))
    validate_config(cfg)  # the one declaration is the one the config checks against


def test_the_component_checks_its_own_arguments_with_the_same_declaration(monkeypatch):
    with pytest.raises(ValueError, match=r"mode = 'turbo' is not valid; choose one of \['exact', 'fast'\]"):
        check_mode("turbo")
    monkeypatch.setitem(MSGROptions.CHOICES, "mode", ("exact", "fast", "turbo"))
    assert check_mode("turbo") == "turbo"


def test_options_read_from_the_config_and_name_the_key_of_a_bad_value():
    cfg = get_default_config()
    cfg.msgr.eps = [0.1, 0.2]
    cfg.msgr.stages = ["conv2", "conv3"]
    opts = MSGROptions.from_config(cfg)
    assert opts.eps == (0.1, 0.2) and opts.stages == ("conv2", "conv3") and opts.step_h is None
    assert dataclasses.replace(opts, fast_h=0.5).step_h == 0.5
    assert dataclasses.replace(opts, q=3.0).q == 3.0  # any norm order >= 1, as the penalty computes
    with pytest.raises(ConfigError, match=r"^msgr\.q = 0\.5 is not valid; q is a norm order >= 1"):
        dataclasses.replace(opts, q=0.5)
    with pytest.raises(ConfigError, match=r"^msgr\.eps has 3 values for 2 stages"):
        MSGROptions(enabled=True, stages=("a", "b"), eps=(1.0, 2.0, 3.0))
