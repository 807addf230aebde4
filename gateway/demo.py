"""The embedded demo: a Location30 bundle built on first use and cached.

The bundle is built by the offline job in a subprocess (``python -m defense_models train
--preset demo``), so the gateway package never imports training code.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from gateway import __version__
from gateway.artifacts import load_bundle
from gateway.errors import BundleError

log = logging.getLogger("gateway.demo")

#: Bump when the demo recipe or bundle contents change, so stale caches are rebuilt.
DEMO_RECIPE = 6


def demo_bundle_dir(cache_root: Path) -> Path:
    return Path(cache_root) / f"demo-location30-r{DEMO_RECIPE}-v{__version__}"


def ensure_demo_bundle(cache_root: Path) -> Path:
    path = demo_bundle_dir(cache_root)
    try:
        load_bundle(path)
        log.info("using the cached demo bundle at %s", path)
        return path
    except BundleError:
        pass
    log.info("building the demo bundle at %s (Location30, small MLP; takes seconds)", path)
    cmd = [
        sys.executable,
        "-m",
        "defense_models",
        "train",
        "--dataset",
        "location30",
        "--preset",
        "demo",
        "--out",
        str(path),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BundleError(
            f"building the demo bundle failed (exit {proc.returncode}); install the training extra with "
            f"`pip install -e '.[train]'` and retry.\n{tail}"
        )
    load_bundle(path)
    return path
