"""Stage capture for MSGR (docs/methods.md G2, G3): which module outputs are regularised.

Stage names are module paths for ``model.get_submodule``: ResNets (Torchreid's ``resnet*``,
our ``resnet50_bnfc512`` / ``msfl_resnet50``) ``layer1``..``layer4`` (C2..C5; the paper
regularises layer1 and layer2); OSNet ``conv1``..``conv5``. :class:`StageCapture` puts
forward hooks on them, so any model's ordinary forward yields the stage outputs x_s (and,
for fast mode, can add a perturbation to them); nothing in the model changes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..distributed import unwrap_model

__all__ = ["StageCapture", "stage_modules", "expand_eps"]


def stage_modules(model: nn.Module, stages: Sequence[str]) -> Dict[str, nn.Module]:
    """``{name: model.get_submodule(name)}``; an unknown name is a ValueError listing the model's
    top-level children (ResNet: layer1..layer4; OSNet: conv1..conv5)."""
    net = unwrap_model(model)
    if not stages:
        raise ValueError("MSGR needs at least one stage name, e.g. ['layer1', 'layer2']")
    if len(set(stages)) != len(stages):
        raise ValueError(f"MSGR stage names repeat: {list(stages)}")
    found = {}
    for name in stages:
        try:
            found[name] = net.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in net.named_children()]
            raise ValueError(
                f"MSGR stage '{name}' is not a submodule of {type(net).__name__}; its top-level "
                f"modules are {children} (ResNet stages: layer1..layer4; OSNet: conv1..conv5)"
            ) from None
    return found


def expand_eps(eps: Union[float, Sequence[float]], stages: Sequence[str]) -> Dict[str, float]:
    """One eps for all stages, or one per stage (G3) -> ``{stage: eps}``."""
    if isinstance(eps, (int, float)):
        values = [float(eps)] * len(stages)
    else:
        values = [float(e) for e in eps]
        if len(values) == 1:
            values = values * len(stages)
    if len(values) != len(stages):
        raise ValueError(f"eps has {len(values)} values for {len(stages)} stages {list(stages)}; "
                         "give one value or one per stage")
    if any(not (e >= 0) for e in values):
        raise ValueError(f"eps must be >= 0, got {values}")
    return dict(zip(stages, values))


class StageCapture:
    """Forward hooks on named stages: ``outputs[name]`` is the stage's output of the forward
    run inside the ``with`` block; with ``deltas`` the hook returns ``output + deltas[name]``
    instead (and records that); ``on_output(name)`` is called after each capture. Each stage
    must run exactly once per forward. Fast mode's extras: ``split_first`` returns a detached
    leaf for the first stage that runs (the original in ``upstream = (name, tensor)``), and
    ``base[name]`` replaces that stage's output by a given tensor (before ``deltas``).

        with StageCapture(model, ['layer1', 'layer2']) as cap:
            logits = model(x)
        cap.outputs['layer1']
    """

    def __init__(self, model: nn.Module, stages: Sequence[str],
                 deltas: Optional[Mapping[str, torch.Tensor]] = None,
                 on_output: Optional[Callable[[str], None]] = None,
                 split_first: bool = False,
                 base: Optional[Mapping[str, torch.Tensor]] = None):
        self.modules = stage_modules(model, stages)
        self.on_output = on_output
        self.split_first = split_first
        self.base = dict(base or {})
        self.upstream: Optional[tuple] = None
        self.deltas = dict(deltas or {})
        unknown = set(self.deltas) - set(self.modules)
        if unknown:
            raise ValueError(f"perturbation given for unknown stages {sorted(unknown)}")
        self.outputs: Dict[str, torch.Tensor] = {}
        self._versions: Dict[str, int] = {}
        self._handles: List = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_tensor(output):
                raise TypeError(f"MSGR stage '{name}' returned {type(output).__name__}, not a tensor")
            if name in self.outputs:
                raise RuntimeError(
                    f"MSGR stage '{name}' ran twice in one forward (shared module, or DataParallel "
                    "on several GPUs); choose a module that runs once"
                )
            if name in self.base:  # the given tensor stands in for this forward's output
                output = self.base[name]
            if self.split_first and not self.outputs and output.requires_grad:
                # the graph below the first stage is kept apart: a backward of the loss
                # stops at this leaf, and the caller back-props ``upstream`` once, later
                self.upstream = (name, output)
                output = output.detach().requires_grad_()
            if name in self.deltas:
                output = output + self.deltas[name].to(output.dtype)
            self.outputs[name] = output
            self._versions[name] = output._version
            if self.on_output is not None:
                self.on_output(name)
            return output

        return hook

    def __enter__(self) -> "StageCapture":
        self.upstream = None
        self.outputs.clear()
        self._versions.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            missing = [n for n in self.modules if n not in self.outputs]
            if missing:
                raise RuntimeError(f"MSGR stages {missing} did not run in the forward pass")

    def check_unmodified(self) -> None:
        """Raise if a captured output was modified in place after the stage returned it
        (its gradient would then be that of the modified tensor)."""
        bad = [n for n, t in self.outputs.items() if t._version != self._versions[n]]
        if bad:
            raise RuntimeError(
                f"the outputs of MSGR stages {bad} were modified in place later in the forward "
                "(e.g. ReLU(inplace=True) right after the stage); pick another stage or make "
                "that operation out of place"
            )
