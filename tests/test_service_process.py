"""`sampler-service serve` as a real process: start-up errors are one JSON record naming the setting
(exit code 2, no secret in it), every stderr line is JSON, and SIGTERM drains visibly: health
NOT_SERVING and UNAVAILABLE for new work while the port stays open, the request in flight
finishes, exit code 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SECRET = "tok-3f9a1c77e2-do-not-print"


def serve(*flags: str, **env: str) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "SAMPLER_WARMUP": "false",
        "SAMPLER_DEVICE": "cpu",
        **env,
    }
    command = [sys.executable, "-m", "sampler_service", "serve", *flags]
    return subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def records(text: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as JSON (fails on a plain line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def failed_start(*flags: str, **env: str) -> dict[str, Any]:
    process = serve(*flags, **env)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    (record,) = records(err)
    assert record["level"] == "ERROR"
    assert "Traceback" not in err
    assert SECRET not in err
    return record


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.slow
def test_start_up_errors_are_one_json_line_without_secrets(busy_port: int) -> None:
    record = failed_start("--port", str(busy_port), SAMPLER_AUTH_TOKEN=SECRET)
    assert record["setting"] == "port"
    assert "Address already in use" in record["message"]
    # a model validator's error would quote the whole input, token included
    record = failed_start(SAMPLER_AUTH_TOKEN=SECRET, SAMPLER_TLS_CERT="/missing.pem")
    assert "tls_cert and tls_key must be given together" in record["message"]


def test_start_up_problems_name_the_setting_and_the_cause(tmp_path: Path, busy_port: int) -> None:
    """create_server's checks, in process (the line and exit code are checked above)."""
    import asyncio

    from sampler_service.server import StartupError, create_server
    from sampler_service.settings import load_settings
    from tests.test_service import SERVED

    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"port": busy_port}, "port", "Address already in use"),
        ({"auth_token_file": tmp_path / "absent-token"}, "auth_token_file", "No such file"),
    ]
    if shutil.which("openssl") is not None:
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )
        other_key = tmp_path / "other-key.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True, capture_output=True)
        broken = tmp_path / "broken.pem"
        broken.write_text(cert.read_text()[:200])  # a truncated certificate
        unreadable = tmp_path / "unreadable.pem"
        unreadable.mkdir()  # a folder: read fails whoever runs the test (root reads any mode-000 file)
        cases += [
            ({"tls_cert": tmp_path / "absent.pem", "tls_key": key}, "tls_cert", "No such file"),
            ({"tls_cert": unreadable, "tls_key": key}, "tls_cert", "Is a directory"),
            ({"tls_cert": broken, "tls_key": key}, "tls_cert/tls_key", "do not load as a pair"),
            ({"tls_cert": cert, "tls_key": other_key}, "tls_cert/tls_key", "do not load as a pair"),
            ({"tls_cert": cert, "tls_key": cert}, "tls_key", "not a PEM private key"),
            ({"tls_cert": key, "tls_key": key}, "tls_cert", "not a PEM certificate"),
        ]
    for overrides, setting, cause in cases:
        settings = load_settings(None, **{"port": 0, "device": "cpu", "warmup": False, **overrides})
        with pytest.raises(StartupError) as caught:
            asyncio.run(create_server(settings, SERVED.get(settings)))
        assert caught.value.setting == setting, caught.value
        assert cause in caught.value.cause, caught.value


def test_python_warnings_become_json_records(capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from sampler_service.__main__ import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("overflow encountered in exp", RuntimeWarning, stacklevel=1)
        logging.getLogger("sampler_service").info("after the warning")
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved[0], saved[1]
    found = records(capfd.readouterr().err)
    warning = next(r for r in found if r["logger"] == "py.warnings")
    assert warning["level"] == "WARNING"
    assert "RuntimeWarning: overflow encountered in exp" in warning["message"]


def _listening_port(process: subprocess.Popen[str], lines: list[str]) -> int:
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        record = json.loads(line)
        if record["message"].startswith("SERVING"):
            listening = next(json.loads(x)["message"] for x in lines if "listening on" in x)
            return int(listening.split(";")[0].rsplit(":", 1)[1])
    raise AssertionError("the server did not report SERVING")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "threads"), [("request", None), ("step", "2")])
def test_sigterm_drains_visibly_and_exits_zero(mode: str, threads: str | None) -> None:
    """In both batching modes; the threads setting is applied at start-up (OMP_NUM_THREADS=1 here)."""
    env = {"SAMPLER_GRACE_SECONDS": "120", "SAMPLER_BATCHING__MODE": mode}
    if threads is not None:
        env["SAMPLER_THREADS__INTRA_OP"] = threads
    process = serve("--port", "0", **env)
    lines: list[str] = []
    try:
        port = _listening_port(process, lines)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub, health = pb_grpc.SamplerServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        # a request that runs for a while on CPU (600 network evaluations)
        stream = stub.Generate(pb.GenerateRequest(model="mnist", solver="heun", steps=300, seeds=[1]))
        assert next(stream).WhichOneof("event") == "accepted"
        events: list[Any] = []
        reader = threading.Thread(target=lambda: events.extend(stream))
        reader.start()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status != (
            health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() < deadline, "health never said NOT_SERVING"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Plan(pb.GenerateRequest(model="mnist", solver="euler", steps=4), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        reader.join(120)
        assert sum(e.WhichOneof("event") == "result" for e in events) == 1  # the request in flight finished
        channel.close()
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    found = records("".join(lines) + rest)  # every line is JSON
    messages = [r["message"] for r in found]
    assert any(m.startswith("draining") for m in messages)
    applied = next(m for m in messages if m.startswith("torch threads"))
    assert applied.startswith(f"torch threads: intra-op {threads or 1}, inter-op 1 "), applied
    assert applied.endswith(f"batching mode {mode}")
    assert messages[-1] == "stopped"
    assert not [r for r in found if r["level"] == "ERROR"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_failed_tls_handshakes_leave_no_plain_lines(tmp_path: Path) -> None:
    """grpc's core logs a plain line per failed TLS handshake unless told otherwise; anyone can cause them."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    process = serve("--port", "0", SAMPLER_TLS_CERT=str(cert), SAMPLER_TLS_KEY=str(key))
    lines: list[str] = []
    try:
        port = _listening_port(process, lines)
        for attempt in range(3):  # plain-text gRPC and raw bytes at a TLS port
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(os.urandom(2000 + attempt))
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    records("".join(lines) + rest)  # every line is JSON
    assert "Handshake" not in rest
