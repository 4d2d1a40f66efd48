"""torchreid-ext: plug-ins for Torchreid (MSFL-ResNet50, MSGR, DRSL, SN, fast evaluator).

``import torchreid_ext`` registers our models and datasets into Torchreid's registries
(:func:`torchreid_ext.plugin.register`), and changes three things of Torchreid's:

* the image reader of its ``ImageDataset``: an unreadable file raises an error naming it, where
  Torchreid's reader retries it forever;
* its ``load_checkpoint`` (behind ``load_pretrained_weights``, ``resume_from_checkpoint`` and
  ``FeatureExtractor``): every weights file goes through our safe loader
  (:func:`torchreid_ext.checkpoint.load_checkpoint`);
* the weights loading of its model modules: the ImageNet weights they read (torch.hub's cache,
  OSNet's ``torch.load``) go through the same safe loader.

Nothing else happens at import: no logging handler (the command lines install one;
:mod:`torchreid_ext.log`), no loss plug-ins from the environment (:mod:`torchreid_ext.console`).
"""
from .adapter import torchreid as _torchreid  # noqa: F401
from .builders import build_engine  # noqa: F401
from .config import get_default_config, load_config  # noqa: F401
from .models import available_models, build_model, register_model  # noqa: F401
from .plugin import register
from .run_options import engine_run_kwargs  # noqa: F401

register()

__version__ = "0.1.0"
