"""The committed gRPC stubs are exactly what the pinned grpcio-tools generates from the .proto, and
the contract keeps the house rules (enums start at *_UNSPECIFIED = 0, every field documented)."""

from __future__ import annotations

import re
from pathlib import Path

from tools import protogen


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    for path, name in zip(generated, protogen.GENERATED, strict=True):
        committed = protogen.REPO_ROOT / name
        assert committed.is_file(), f"{name} is missing: run make protos"
        assert path.read_text() == committed.read_text(), (
            f"{name} differs from what grpcio-tools generates: run make protos"
        )


def test_proto_house_rules() -> None:
    text = (protogen.PROTO_ROOT / "sampler/v1/sampler.proto").read_text()
    assert re.search(r"^package sampler\.v1;", text, re.MULTILINE)
    for enum, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.DOTALL):
        first = re.search(r"(\w+) = (\d+);", body)
        assert first is not None
        assert first.group(1).endswith("_UNSPECIFIED"), enum
        assert first.group(2) == "0", enum
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s+(rpc |(optional |repeated )?[\w.]+ \w+ = \d+;)", line):
            previous = lines[number - 1].strip()
            assert previous.startswith("//"), f"line {number + 1} has no comment above it: {line.strip()}"
