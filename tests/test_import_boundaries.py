"""The one-way import rule and a lean import: gateway never loads the offline job."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CODE = """
import sys
from pathlib import Path
import gateway, gateway.app, gateway.__main__, gateway.api, gateway.oip, gateway.demo
from gateway.defenses import available_defenses
available_defenses()
bad = sorted(m for m in sys.modules if m.split('.')[0] in {'defense_models', 'onnx', 'matplotlib', 'sklearn', 'opacus'})
print(','.join(bad))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'onnxruntime', 'numba'})
print(','.join(heavy))
"""

#: The compiled loops load numba (~130 MiB of RSS) only when a defense that uses one is built with them.
ENGINES = """
import sys, torch
from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.classifier import AepptSubstitute, MemGuardClassifier
from gateway.defenses.memguard import MemGuard, MemGuardParams
cpu, z = torch.device("cpu"), torch.randn(3, 10)
p, keys = torch.softmax(z.double(), 1), torch.zeros(3, 32, dtype=torch.uint8)
for rows in (1, 3):
    MemGuard(MemGuardClassifier(10), MemGuardParams(engine=sys.argv[1]), cpu).defend(p[:rows], z[:rows], keys[:rows])
    Aeppt(AepptSubstitute(10), AepptParams(engine=sys.argv[1]), cpu).defend(p[:rows], z[:rows], keys[:rows])
print("numba" in sys.modules)
"""


def test_gateway_never_imports_training_code() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "", f"gateway imported {out[0]}"
    assert out[1] == "", "importing gateway must not load onnxruntime or numba (they load when used)"


def test_numba_loads_only_for_the_compiled_engine() -> None:
    def loads(engine: str) -> str:
        return subprocess.run([sys.executable, "-c", ENGINES, engine], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    assert (loads("torch"), loads("compiled")) == ("False", "True")


def test_package_import_is_cheap() -> None:
    code = "import sys, gateway, defense_models; print(len([m for m in sys.modules if m.startswith('torch')]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


#: The offline job's three flows and what each may import: training is the base, bundling builds on
#: training (and runs the audit's attacks for its self-audit), auditing never imports bundling.
FLOW_RULES = {"training": ("bundle", "audit"), "audit": ("bundle",), "bundle": ()}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_offline_flows_import_one_way() -> None:
    root = Path(__file__).resolve().parents[1] / "defense_models"
    bad = []
    for flow, banned in FLOW_RULES.items():
        for path in sorted((root / flow).rglob("*.py")):
            for module in _imported_modules(path):
                if any(module == f"defense_models.{b}" or module.startswith(f"defense_models.{b}.") for b in banned):
                    bad.append(f"{path.relative_to(root.parent)} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_private_defense_modules_outside_defenses() -> None:
    """What the gateway releases for given outputs has one public path (``gateway.pipeline``); the
    defenses' private helpers (``gateway/defenses/_*.py``) stay theirs."""
    root = Path(__file__).resolve().parents[1]
    bad = []
    for package in ("gateway", "defense_models", "bench"):
        for path in sorted((root / package).rglob("*.py")):
            if path.parent == root / "gateway" / "defenses":
                continue
            bad += [f"{path.relative_to(root)} imports {m}" for m in _imported_modules(path)
                    if m.startswith("gateway.defenses._")]  # fmt: skip
    assert not bad, "\n".join(bad)
