"""The version trap: tritonclient needs protobuf < 7, grpcio-tools after 1.80 needs protobuf >= 7.

pip installs an incompatible pair without a word and `pip check` misses it (the requirement sits
behind tritonclient's `grpc` extra), so this test reads every installed package's requirements,
extras included, and fails if any is not met.
"""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PACKAGES = [
    ("tritonclient", ["grpc"]),
    ("grpcio-tools", []),
    ("grpcio-health-checking", []),
    ("grpcio-reflection", []),
    ("onnx", []),
    ("cnnserve", ["export", "test"]),
]


def _installed(name: str) -> Version:
    return Version(metadata.version(name))


@pytest.mark.parametrize(("package", "extras"), PACKAGES)
def test_requirements_with_extras_are_met(package: str, extras: list[str]) -> None:
    try:
        requires = metadata.requires(package) or []
    except metadata.PackageNotFoundError:
        pytest.fail(f"{package} is not installed: run `make setup`")
    problems = []
    for text in requires:
        requirement = Requirement(text)
        environment = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if requirement.marker and not any(requirement.marker.evaluate(e) for e in environment):
            continue
        if requirement.name == "torch":
            continue  # the export extra; its CPU build carries a local version label
        try:
            version = _installed(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement} is not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} but {requirement.name} {version} is installed")
    assert not problems, f"{package}: " + "; ".join(problems)


def test_the_protobuf_major_version_suits_both_sides() -> None:
    assert _installed("protobuf").major == 6
    assert _installed("grpcio-tools") < Version("1.81")
    assert _installed("grpcio") >= Version("1.81.1")
