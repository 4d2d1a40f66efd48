"""``read_only(path)``: make a folder unwritable even for root (``chattr +i`` as root, whose
writes ignore permission bits; ``chmod 555`` otherwise), restored on exit."""
import contextlib
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def read_only(path):
    path = str(path)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
            pytest.skip("running as root and 'chattr +i' is not available here: cannot make a folder read-only")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    else:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, mode)
