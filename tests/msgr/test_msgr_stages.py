"""torchreid_ext.msgr.stages (docs/methods.md G2, G3): stage lookup, capture, perturbation,
per-stage eps, and the checks on how stages run."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msgr_nets import STAGES, make
from torchreid_ext.msgr import StageCapture, expand_eps, msgr_backward, stage_modules


def test_unknown_stage_lists_the_models_children():
    net, _, _ = make()
    with pytest.raises(ValueError, match=r"'layer9'.*\['stem', 'stage1', 'pool', 'stage2', 'drop', 'classifier'\]"):
        stage_modules(net, ["stage1", "layer9"])
    # DataParallel / DDP wrappers are looked through
    assert stage_modules(nn.DataParallel(net), ["stage1"])["stage1"] is net.stage1
    with pytest.raises(ValueError, match="repeat"):
        stage_modules(net, ["stage1", "stage1"])


def test_expand_eps_one_value_or_one_per_stage():
    assert expand_eps(0.1, STAGES) == {"stage1": 0.1, "stage2": 0.1}
    assert expand_eps([0.2], STAGES) == {"stage1": 0.2, "stage2": 0.2}
    assert expand_eps([0.2, 0.3], STAGES) == {"stage1": 0.2, "stage2": 0.3}
    with pytest.raises(ValueError, match="eps has 3 values for 2 stages"):
        expand_eps([0.1, 0.2, 0.3], STAGES)
    with pytest.raises(ValueError, match=r"eps must be >= 0, got \[-1\.0, -1\.0\]"):
        expand_eps(-1, STAGES)


def test_in_place_change_of_a_stage_output_is_caught():
    net, x, y = make()
    net.stage1.append(nn.Identity())
    net.stage2.insert(0, nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match=r"\['stage1'\] were modified in place"):
        msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, 0.1)


def test_stage_capture_perturbs_and_requires_single_call():
    net, x, _ = make()
    with StageCapture(net, ["stage2"]) as cap:
        base = net(x)
    delta = torch.randn_like(cap.outputs["stage2"])
    with StageCapture(net, ["stage2"], {"stage2": delta}) as cap2:
        pert = net(x)
    ref = net.classifier((cap.outputs["stage2"] + delta).mean((2, 3)))
    torch.testing.assert_close(pert, ref)
    torch.testing.assert_close(cap2.outputs["stage2"], cap.outputs["stage2"] + delta)
    assert not torch.allclose(pert, base)
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, lin)  # one module run twice
    with pytest.raises(RuntimeError, match="ran twice"):
        with StageCapture(shared, ["0"]):
            shared(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"stages \['stage2'\] did not run"):
        with StageCapture(net, ["stage2"]):
            net.stem(x)
