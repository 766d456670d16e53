"""The runtime (`pip install .`, no extras) is enough for the service: the real server and
`sampler-client generate` run in subprocesses where every package of an extra ([bench], [fid], [dev])
and our own non-runtime folders are hidden, as if not installed. A runtime module that imports one of
them fails here. `sampler-amed` (named by the service's missing-predictor errors) trains with the
extras hidden too; only bench/ may be seen there."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# Ours, but never imported by the service (bench/ only by sampler-amed and sampler-bench).
NOT_RUNTIME = ("bench", "tools", "tests")

# Runs an entry point ("module:function", then its arguments) with the named top-level packages
# hidden from every import finder: `import x` raises ModuleNotFoundError and find_spec answers None,
# so optional-import probes (diffusers' is_accelerate_available) see them as absent, as in a
# runtime-only install, rather than tripping over them.
HIDE_AND_RUN = """
import importlib, sys
hidden = frozenset(sys.argv[1].split(","))
class Hidden:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find is not None else None
    def __getattr__(self, name):
        return getattr(self.inner, name)
sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
module, _, function = sys.argv[2].partition(":")
sys.argv = [sys.argv[2], *sys.argv[3:]]
raise SystemExit(getattr(importlib.import_module(module), function)())
"""


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def extras_only_packages() -> set[str]:
    """Top-level import names of the installed distributions that only an extra asks for."""
    ours = _name(PYPROJECT["project"]["name"])
    runtime = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_name(r) for group in PYPROJECT["project"]["optional-dependencies"].values() for r in group}
    only = extras - runtime - {ours}
    return {
        top
        for top, distributions in importlib.metadata.packages_distributions().items()
        if any(_name(d) in only for d in distributions)
    }


def run_hidden(entry: str, args: list[str], hidden: set[str], **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HIDE_AND_RUN, ",".join(sorted(hidden)), entry, *args],
        cwd=REPO_ROOT,
        text=True,
        **popen,
    )


def test_extras_are_found_in_this_environment() -> None:
    """The hiding is real: the dev environment has these, so hiding them is what makes them absent."""
    hidden = extras_only_packages()
    assert {"matplotlib", "accelerate", "scipy", "pytest", "grpc_tools"} <= hidden


def test_serve_and_generate_with_only_the_runtime(tmp_path: Path) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    hidden = extras_only_packages() | set(NOT_RUNTIME)
    server = run_hidden(
        scripts["sampler-service"],
        ["serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"],
        hidden,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert server.stdout is not None
        port = None
        log: list[str] = []
        began = time.perf_counter()
        for line in server.stdout:  # ends if the server dies
            log.append(line)
            if (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", line)) is not None:
                port = int(found.group(1))
            if '"SERVING ' in line:
                break
            assert time.perf_counter() - began < 120, "".join(log)
        assert server.poll() is None, "".join(log)
        assert port is not None, "".join(log)

        out = tmp_path / "samples"
        request = ["--model", "mnist", "--solver", "dpmpp_2m", "--steps", "4", "--labels", "3,7", "--seed", "0"]
        client = run_hidden(
            scripts["sampler-client"],
            ["--target", f"127.0.0.1:{port}", "--timeout", "60", "generate", *request, "--out", str(out), "--quiet"],
            hidden,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = client.communicate(timeout=120)
        assert client.returncode == 0, stderr
        files = [Path(row["file"]) for row in json.loads(stdout)]
        assert [f.name for f in files] == ["sample-000-seed0.png", "sample-001-seed1.png"]
        assert all(f.read_bytes().startswith(b"\x89PNG") for f in [*files, out / "grid.png"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    warnings = [line for line in log if "accelerate" in line]
    assert not warnings, warnings  # diffusers is told, not warned, that accelerate is absent


def test_sampler_amed_trains_with_only_the_runtime(tmp_path: Path) -> None:
    """The command the service's missing-predictor errors name needs no extra."""
    args = ["train", "--model", "mnist", "--nfe", "3", "--trajectories", "2", "--batch-size", "2", "--threads", "1"]
    amed = run_hidden(
        PYPROJECT["project"]["scripts"]["sampler-amed"],
        [*args, "--out", str(tmp_path), "--quiet"],
        extras_only_packages() | {"tools", "tests"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, stderr = amed.communicate(timeout=300)
    assert amed.returncode == 0, stderr
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_sampler_bench_names_the_extra_it_needs() -> None:
    bench = run_hidden(
        PYPROJECT["project"]["scripts"]["sampler-bench"],
        ["accuracy", "--out", "unused"],
        extras_only_packages(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 2, stderr
    assert "matplotlib, scipy not installed: the bench needs the [bench] extra" in stderr
