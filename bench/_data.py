"""Datasets the benchmarks may install: CI tests use small synthetic files instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: Where Debian's ``dataset-fashion-mnist`` puts the IDX files (the ``fashion_mnist`` dataset reads them).
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def ensure_fashion_mnist() -> Path:
    """Install Debian's ``dataset-fashion-mnist`` if its files are missing; return their directory."""
    if not FASHION_DIR.exists():
        print("installing dataset-fashion-mnist (apt-get)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)
    return FASHION_DIR
