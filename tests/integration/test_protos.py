"""The generated code in dd/proto: what protos/ says now, made by the pinned generator, importable on the
oldest protobuf and grpcio that setup.cfg allows.

protobuf's generated code refuses (at import) a runtime older than the protoc that made it, and gRPC's
refuses an older grpcio, so the generator is pinned (scripts/compile_protos.sh) to the oldest releases
setup.cfg allows. Byte-for-byte freshness needs that very generator: `.ci/run` installs it in its
lowest-pins environment and runs this file there. Any other grpcio-tools still checks that the code
describes the .proto files as they are.
"""

from __future__ import annotations

import configparser
import filecmp
import importlib
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "dd" / "proto"
PROTOS = REPO / "protos"
GRPC_FAMILY = ("grpcio", "grpcio-health-checking", "grpcio-reflection")


def pinned_generator() -> str:
    match = re.search(r"^GRPCIO_TOOLS=(\S+)$", (REPO / "scripts" / "compile_protos.sh").read_text(), re.M)
    assert match, "scripts/compile_protos.sh must set GRPCIO_TOOLS=<version>"
    return match.group(1)


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def setup_cfg_floors() -> dict[str, Version]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    floors = {}
    for line in cfg["options"]["install_requires"].split("\n"):
        if not line.strip():
            continue
        req = Requirement(line.strip())
        low = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if low:
            floors[req.name] = low[0]
    return floors


def lowest_pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "lowest-pins.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.strip().partition("==")
            pins[name] = Version(pinned)
    return pins


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def test_generated_code_is_what_the_pinned_generator_makes(tmp_path: Path) -> None:
    pin, have = pinned_generator(), installed("grpcio-tools")
    if have != pin:
        pytest.skip(f"grpcio-tools {have} is installed, not the pinned {pin}: .ci/run makes this comparison in its "
                    f"lowest-pins environment; test_generated_code_describes_the_protos checks freshness here")
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(PROTOS, work / "protos")
    shutil.copytree(REPO / "scripts", work / "scripts")
    subprocess.run(["bash", "scripts/compile_protos.sh"], cwd=work, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh = work / "dd" / "proto"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    current_files = sorted(p.relative_to(GENERATED) for p in GENERATED.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts)
    assert fresh_files == current_files, "dd/proto is stale: run scripts/compile_protos.sh"
    stale = [str(p) for p in fresh_files if not filecmp.cmp(fresh / p, GENERATED / p, shallow=False)]
    assert not stale, f"dd/proto is stale ({stale}): run scripts/compile_protos.sh"


def test_generated_code_describes_the_protos(tmp_path: Path) -> None:
    """With whatever protoc is installed: the descriptors compiled from protos/ now are the checked-in ones."""
    descriptor_set = tmp_path / "protos.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
                    f"--descriptor_set_out={descriptor_set}", *proto_files()], check=True)
    compiled = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    assert sorted(f.name for f in compiled.file) == proto_files()
    generated = sorted(str(p.relative_to(GENERATED)).removesuffix("_pb2.py") + ".proto"
                       for p in GENERATED.rglob("*_pb2.py"))
    assert generated == proto_files(), "dd/proto has other files than protos/: run scripts/compile_protos.sh"
    for fresh in compiled.file:
        module = importlib.import_module("dd.proto." + fresh.name.removesuffix(".proto").replace("/", ".") + "_pb2")
        checked_in = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        for proto in (fresh, checked_in):  # protoc adds JSON names to descriptor sets, not to generated code
            for message in proto.message_type:
                _clear_json_names(message)
        assert checked_in == fresh, f"dd/proto is stale for {fresh.name}: run scripts/compile_protos.sh"


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def test_generated_code_runs_on_the_oldest_allowed_protobuf_and_grpcio() -> None:
    """The generated code's own import-time checks ask for no more than setup.cfg's floors, which are the
    versions .ci/run tests in its lowest-pins environment."""
    floors, pins = setup_cfg_floors(), lowest_pins()
    for name in ("protobuf",) + GRPC_FAMILY:
        assert pins.get(name) == floors.get(name), \
            f".ci/lowest-pins.txt pins {name}=={pins.get(name)} but setup.cfg's floor is {floors.get(name)}"
    assert str(pins["grpcio-tools"]) == pinned_generator(), \
        ".ci/lowest-pins.txt and scripts/compile_protos.sh (GRPCIO_TOOLS) must pin the same grpcio-tools"
    for path in sorted(GENERATED.rglob("*_pb2.py")):
        match = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
                          r"\s*(\d+),", path.read_text())
        assert match, f"{path}: no protobuf runtime version check found"
        needs = Version(".".join(match.groups()))
        assert needs <= floors["protobuf"], \
            f"{path} needs protobuf >= {needs}, setup.cfg allows {floors['protobuf']}: run scripts/compile_protos.sh"
    for path in sorted(GENERATED.rglob("*_pb2_grpc.py")):
        match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.M)
        assert match, f"{path}: no GRPC_GENERATED_VERSION found"
        assert Version(match.group(1)) <= floors["grpcio"], \
            f"{path} needs grpcio >= {match.group(1)}, setup.cfg allows {floors['grpcio']}: run scripts/compile_protos.sh"
