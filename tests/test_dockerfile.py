"""The container's own commands, run outside Docker (these machines have no Docker engine): the
image's CMD serves the embedded model with the image's environment, its HEALTHCHECK command
reports healthy once the server is SERVING, and SIGTERM drains and exits cleanly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_dockerfile_commands_serve_report_health_and_drain(tmp_path: Path) -> None:
    steps = dict(instructions())
    cmd = json.loads(steps["CMD"])
    health = steps["HEALTHCHECK"]
    health_cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    assert "USER" in steps
    assert steps["STOPSIGNAL"] == "SIGTERM"
    env = {**os.environ, **image_env()}
    port, metrics_port = free_port(), free_port()
    env.update(
        SAMPLER_PORT=str(port),
        SAMPLER_METRICS_PORT=str(metrics_port),
        SAMPLER_DEVICE="cpu",
        SAMPLER_HOST="127.0.0.1",
        SAMPLER_METRICS_HOST="127.0.0.1",  # loopback in tests
        HF_HOME=str(tmp_path / "hf"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    began = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            probe = subprocess.run(health_cmd, env=env, capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                break
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.perf_counter() - began < 90, probe.stdout + probe.stderr
            time.sleep(0.2)
        print(f"healthy {time.perf_counter() - began:.1f} s after start (CPU, embedded model)")
        assert "SERVING" in probe.stdout
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "sampler_admitted_requests" in text
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        log = server.stdout.read() if server.stdout else ""
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        messages = [r["message"] for r in records]
        assert any(m.startswith("SERVING mnist") for m in messages), log
        assert messages[-1] == "stopped"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
