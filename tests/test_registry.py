"""The one Registry type: duplicate-name rule and the wording of an unknown name."""
import pytest

from torchreid_ext.errors import UnknownNameError, UserError
from torchreid_ext.registry import Registry


def first():
    return 1


def second():
    return 2


def test_unknown_name_names_the_key_the_value_and_the_choices():
    reg = Registry("distance")
    reg.register("euclidean", first)
    reg.register("cosine", second)
    with pytest.raises(UnknownNameError) as info:
        reg.get("manhattan", key="loss.drsl.distance")
    assert str(info.value) == "loss.drsl.distance = 'manhattan' is unknown; choose one of ['cosine', 'euclidean']"
    assert isinstance(info.value, UserError) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownNameError, match=r"^distance = 'l1' is unknown; choose one of \['cosine', 'euclidean'\]"):
        reg["l1"]  # without a key the message names the kind


def test_a_taken_name_takes_only_the_same_object_again():
    reg = Registry("model")
    reg.register("net", first)
    reg.register("net", first)  # harmless
    with pytest.raises(ValueError, match=r"model name 'net' is already registered"):
        reg.register("net", second)
    assert reg.get("net") is first and list(reg) == ["net"]
