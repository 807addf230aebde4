"""The one-way import rule and a lean import: gateway never loads the offline job."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import gateway, gateway.app, gateway.__main__, gateway.api, gateway.oip, gateway.demo
from gateway.defenses import available_defenses
available_defenses()
bad = sorted(m for m in sys.modules if m.split('.')[0] in {'defense_models', 'onnx', 'matplotlib', 'sklearn', 'opacus'})
print(','.join(bad))
heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime')
print(','.join(heavy))
"""


def test_gateway_never_imports_training_code() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "", f"gateway imported {out[0]}"
    assert out[1] == "", "importing gateway must not load onnxruntime (it loads when the runner starts)"


def test_package_import_is_cheap() -> None:
    code = "import sys, gateway, defense_models; print(len([m for m in sys.modules if m.startswith('torch')]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
