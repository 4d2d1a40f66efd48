"""torchreid-ext: plug-ins for Torchreid (MSFL-ResNet50, MSGR, DRSL, SN, fast evaluator).

``import torchreid_ext`` registers our models and datasets into Torchreid's registries.
"""
from .log import install_console_handler

install_console_handler()

from .adapter import torchreid as _torchreid  # noqa: E402,F401
from .config import engine_run_kwargs, get_default_config, load_config  # noqa: E402,F401
from .engines import build_engine  # noqa: E402,F401
from .models import available_models, build_model, register_model  # noqa: E402,F401
from .plugin import register  # noqa: E402

register()

__version__ = "0.1.0"
