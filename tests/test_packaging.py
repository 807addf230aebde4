"""Dependency metadata that matches what the code uses, and an image that installs what was tested."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    p = PROJECT["project"]
    reqs = p["dependencies"] if group is None else p["optional-dependencies"][group]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def _lowest(req: Requirement) -> Version:
    return min(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))


def test_lower_bounds_cover_what_the_code_uses() -> None:
    core = _requirements()
    assert _lowest(core["numpy"]) >= Version("2.0")  # np.trapezoid
    assert _lowest(core["pydantic-settings"]) >= Version("2.7")  # NoDecode
    build = [Requirement(r) for r in PROJECT["build-system"]["requires"]]
    assert _lowest(next(r for r in build if r.name == "setuptools")) >= Version("77")  # SPDX license string
    assert PROJECT["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().startswith("Apache License")
    assert "tqdm" in _requirements("train") and "tqdm" in _requirements("eval")  # the audit imports it


def test_exactly_one_onnxruntime_on_every_platform() -> None:
    core = _requirements()
    gpu, cpu = core["onnxruntime-gpu"].marker, core["onnxruntime"].marker
    assert isinstance(gpu, Marker) and isinstance(cpu, Marker)
    for platform in ("linux", "win32", "darwin", "freebsd"):
        env = {"sys_platform": platform}
        assert gpu.evaluate(env) != cpu.evaluate(env), platform


def test_image_constraints_satisfy_the_declared_ranges() -> None:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = Version(version)
    for name, req in (_requirements() | _requirements("serve")).items():
        if name in ("torch", "onnxruntime", "onnxruntime-gpu"):
            continue  # pinned by the Dockerfile's build arguments
        assert name in pins, f"deploy/constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
    assert "constraints.txt" in (ROOT / "Dockerfile").read_text()
