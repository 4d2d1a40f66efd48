"""The one module that knows where Torchreid keeps its pieces.

Torchreid exists in two import layouts:

* PyPI ``torchreid`` 0.2.5 repackages upstream 1.4.0 under ``torchreid.reid.*``
  (``torchreid.reid.models``, ``torchreid.reid.engine``, ...);
* upstream Torchreid (``pip install -e .`` from GitHub) is ``torchreid.models``,
  ``torchreid.engine``, ...

Everything else in torchreid_ext asks :func:`torchreid` for a :class:`TorchreidAPI`
and never imports a Torchreid submodule itself.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, List, Optional

from .errors import TorchreidNotFound

__all__ = ["TorchreidAPI", "TorchreidNotFound", "resolve", "torchreid"]

# Sub-packages every supported layout provides.
_PARTS = ("models", "data", "engine", "losses", "metrics", "optim", "utils")


@dataclass(frozen=True)
class TorchreidAPI:
    """Handles to Torchreid's sub-packages, whichever layout is installed."""

    prefix: str  # "torchreid.reid" (PyPI 0.2.5) or "torchreid" (upstream 1.4.0)
    models: ModuleType
    data: ModuleType
    engine: ModuleType
    losses: ModuleType
    metrics: ModuleType
    optim: ModuleType
    utils: ModuleType
    datasets: ModuleType  # data.datasets: the image/video dataset registry
    dataset_base: ModuleType  # data.datasets.dataset: where ImageDataset reads images
    sampler: ModuleType  # data.sampler
    torchtools: ModuleType  # utils.torchtools: where Torchreid reads checkpoints

    @property
    def layout(self) -> str:
        return "pypi" if self.prefix.endswith(".reid") else "upstream"

    # Torchreid keeps its registries in module-level dicts named with two leading
    # underscores; they are plain module attributes (no name mangling).
    def model_factory(self) -> Dict[str, Callable]:
        return vars(self.models)["__model_factory"]

    def image_datasets(self) -> Dict[str, type]:
        return vars(self.datasets)["__image_datasets"]

    def model_modules(self) -> List[ModuleType]:
        """The modules defining Torchreid's models (``<prefix>.models.<name>``: resnet, osnet ...), which
        read their ImageNet weights themselves (``model_zoo.load_url``, ``torch.load``)."""
        names = [info.name for info in pkgutil.iter_modules(getattr(self.models, "__path__", []))]
        return [importlib.import_module(f"{self.models.__name__}.{name}") for name in sorted(names)]

    def submodule(self, name: str) -> ModuleType:
        """Import ``<prefix>.<name>``, e.g. ``submodule('metrics.rank')``."""
        return importlib.import_module(f"{self.prefix}.{name}")


def _load(prefix: str) -> TorchreidAPI:
    mods = {part: importlib.import_module(f"{prefix}.{part}") for part in _PARTS}
    return TorchreidAPI(
        prefix=prefix,
        datasets=importlib.import_module(f"{prefix}.data.datasets"),
        dataset_base=importlib.import_module(f"{prefix}.data.datasets.dataset"),
        sampler=importlib.import_module(f"{prefix}.data.sampler"),
        torchtools=importlib.import_module(f"{prefix}.utils.torchtools"),
        **mods,
    )


def resolve(package: str = "torchreid") -> TorchreidAPI:
    """Find Torchreid's layout under ``package``.

    Tries ``<package>.reid`` (PyPI) first, then ``<package>`` (upstream). The
    package name is a parameter so tests can point it at a fake module tree.
    """
    errors = []
    with warnings.catch_warnings():
        # Torchreid warns at import that its Cython evaluator is missing; our evaluator
        # (torchreid_ext.metrics) is the default, so the warning would only mislead.
        warnings.filterwarnings("ignore", message="Cython evaluation")
        for prefix in (f"{package}.reid", package):
            try:
                importlib.import_module(f"{prefix}.models")
            except ImportError as exc:  # this layout is absent; try the next one
                errors.append(f"{prefix}: {exc}")
                continue
            return _load(prefix)
    raise TorchreidNotFound(
        "Torchreid is not importable in either layout "
        f"({'; '.join(errors)}). Install it with `pip install torchreid==0.2.5` "
        "or from https://github.com/KaiyangZhou/deep-person-reid."
    )


_API: Optional[TorchreidAPI] = None


def torchreid() -> TorchreidAPI:
    """The installed Torchreid, resolved once per process."""
    global _API
    if _API is None:
        _API = resolve("torchreid")
    return _API
