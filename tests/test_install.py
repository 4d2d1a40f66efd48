"""The installed environment: consistent requirements, and every module PyPI torchreid 0.2.5
imports at runtime without declaring it is present (setup.py must bring them)."""
import importlib
import subprocess
import sys

import pytest


def test_pip_check_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# module imported by torchreid -> where it is used
UNDECLARED = {
    "cv2": "rank visualisation (visualize_ranked_results)",
    "scipy.io": "CUHK03 .mat splits",
    "h5py": "CUHK03 raw data",
    "imageio": "CUHK03 image export",
    "gdown": "pretrained OSNet downloads",
    "tensorboard": "SummaryWriter in Engine",
    "yacs.config": "config files",
}


@pytest.mark.parametrize("module", sorted(UNDECLARED))
def test_torchreid_runtime_dependency_is_installed(module):
    importlib.import_module(module)


def test_torchreid_engine_can_write_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
