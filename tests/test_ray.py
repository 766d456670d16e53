"""The service on Ray Serve (sampler_service/ray_app.py): a real local Ray cluster (2 CPUs) running
the shipped deploy/ray/serve.yaml with 2 replicas, called through Ray Serve's gRPC proxy with
`sampler-client` and the generated stubs, compared with the single server on the same requests.

One cluster for the whole module (starting Ray and two replicas is the slow part); the drain test
shuts Serve down and so runs last."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray  # not importorskip: [dev] includes the [ray] extra, and these tests must run in CI
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.serve.schema import ServeDeploySchema

from bench.mnist_quality import quantise
from models.mnist.classifier import load_classifier
from sampler_service import ray_app
from sampler_service.client import main as client_main
from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc
from sampler_service.imaging import decode_raw

from .test_service import FLOAT32_BATCH_TOLERANCE, RunningServer, details, request, rpc_error

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO_ROOT / "deploy" / "ray" / "serve.yaml"
APPLICATION = (("application", "mnist"),)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RayCluster:
    """A local Ray head with the shipped Serve config deployed, and a channel to its gRPC proxy."""

    def __init__(self) -> None:
        self.port = _free_port()
        ray_app.lean_environment()  # as `sampler-service ray` starts its head
        ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
        self.config = ray_app.read_config(SERVE_CONFIG, grpc_port=self.port, replicas=2)
        ray_app.deploy(self.config)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.SamplerServiceStub(self.channel)

    def replicas(self) -> dict[str, int]:
        """Replica state -> count, of the mnist application's deployment."""
        status = serve.status().applications["mnist"].deployments[ray_app.DEPLOYMENT_NAME]
        return {str(getattr(state, "value", state)): int(count) for state, count in status.replica_states.items()}

    def replica_actors(self) -> list[str]:
        return sorted(
            actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::mnist#")
        )

    def stop(self) -> None:
        self.channel.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    running = RayCluster()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def single() -> Iterator[RunningServer]:
    """The single server with the settings of deploy/ray/serve.yaml, for comparisons."""
    running = RunningServer(batching={"max_batch_size": 256, "max_queue_delay_ms": 20.0}, warmup=False)
    yield running
    running.stop()


def _raw(events: list[pb.GenerateEvent]) -> dict[int, np.ndarray]:
    return {e.result.index: decode_raw(e.result.image) for e in events if e.WhichOneof("event") == "result"}


def test_client_generate_through_the_proxy_matches_the_single_server(
    cluster: RayCluster, single: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = ["--target", cluster.target, "--ray", "generate", "--model", "mnist", "--solver", "dpmpp_2m"]
    ask = ["--steps", "20", "--labels", ",".join(map(str, range(10))), "--guidance", "2", "--seed", "100"]
    code = client_main([*head, *ask, "--format", "raw", "--quiet", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    files = sorted(tmp_path.glob("sample-*-seed*.f32"))
    assert [f.name for f in files] == [f"sample-{k:03d}-seed{100 + k}.f32" for k in range(10)]
    through_ray = np.stack([np.fromfile(f, dtype="<f4").reshape(1, 28, 28) for f in files])
    ask = request(
        steps=20,
        labels=list(range(10)),
        guidance=[2.0],
        base_seed=100,
        output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
    )
    alone = _raw(list(single.stub.Generate(ask)))
    direct = np.stack([alone[k] for k in range(10)])
    np.testing.assert_allclose(through_ray, direct, atol=FLOAT32_BATCH_TOLERANCE, rtol=0)
    with torch.inference_mode():
        predicted = load_classifier()(quantise(torch.from_numpy(through_ray.copy()))).argmax(dim=1)
    assert int((predicted == torch.arange(10)).sum()) >= 8


def test_list_and_info_answer_through_the_proxy(cluster: RayCluster, single: RunningServer) -> None:
    (model,) = cluster.stub.ListModels(pb.ListModelsRequest(), metadata=APPLICATION).models
    assert model.name == "mnist"
    assert model.ready
    assert model.fingerprint == single.stub.ListModels(pb.ListModelsRequest()).models[0].fingerprint
    solvers = cluster.stub.ListSolvers(pb.ListSolversRequest(), metadata=APPLICATION).solvers
    assert [s.name for s in solvers] == [s.name for s in single.stub.ListSolvers(pb.ListSolversRequest()).solvers]
    info = cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=APPLICATION)
    assert info.api_version == "sampler.v1"
    assert info.max_batch_size == 256


def test_health_through_the_proxy(
    cluster: RayCluster, single: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sampler-client --ray health`: without --service the proxy answers for itself (Ray's Healthz),
    with --service MODEL that model's replicas answer; grpc.health.v1 with `application` metadata
    gets the single server's answers."""
    for service in ((), ("--service", "mnist")):
        assert client_main(["--target", cluster.target, "--ray", "health", *service]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
    health = health_pb2_grpc.HealthStub(cluster.channel)
    for name in ("", "sampler.v1.SamplerService", "mnist"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), metadata=APPLICATION)
        assert answer.status == single.health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    unknown = health_pb2.HealthCheckRequest(service="sd-xl")
    got = rpc_error(lambda: health.Check(unknown, metadata=APPLICATION))
    assert got.code() == rpc_error(lambda: single.health.Check(unknown)).code() == grpc.StatusCode.NOT_FOUND
    watch = rpc_error(lambda: list(health.Watch(health_pb2.HealthCheckRequest(), metadata=APPLICATION)))
    assert watch.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "poll Health/Check" in watch.details()


def _struct(values: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


# A handful of the single server's bad inputs (tests/test_service.py), each through every method.
BAD_INPUTS = [
    {"steps": 5000},
    {"labels": [11]},
    {"guidance": [2.0]},
    {"solver": "unipc", "solver_params": _struct({"variant": "bh9"})},
    {"num_samples": 1000},
    {"solver": "heun", "steps": None, "nfe": 9},
    {"solver": "rk4"},
    {"model": "sd-xl"},
    {"request_id": "has space"},
]


@pytest.mark.parametrize("fields", BAD_INPUTS, ids=lambda fields: ",".join(fields))
def test_bad_inputs_get_the_single_servers_codes_and_details(
    cluster: RayCluster, single: RunningServer, fields: dict[str, Any]
) -> None:
    ask = request(**{k: v for k, v in fields.items() if v is not None})
    if fields.get("steps", 1) is None:
        ask.ClearField("steps")
    for method in ("Plan", "Generate", "GenerateUnary"):

        def call(stub: Any, metadata: Any, method: str = method) -> None:
            answer = getattr(stub, method)(ask, metadata=metadata)
            if method == "Generate":
                list(answer)

        expected = rpc_error(lambda: call(single.stub, ()))
        got = rpc_error(lambda: call(cluster.stub, APPLICATION))
        assert got.code() == expected.code(), (method, got.details())
        assert got.details() == expected.details()
        assert [d.SerializeToString() for d in details(got)] == [d.SerializeToString() for d in details(expected)]


def _generate(stub: Any, seeds: list[int], steps: int, started: threading.Barrier | None = None) -> Any:
    """Events of one streamed request (RAW), or the RpcError it ended with."""
    events = []
    try:
        for event in stub.Generate(
            request(steps=steps, seeds=seeds, labels=[4], output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32),
            metadata=APPLICATION,
        ):
            events.append(event)
            if started is not None and event.WhichOneof("event") == "accepted":
                started.wait(60)
                started = None
    except grpc.RpcError as error:
        return events, error
    return events, None


def test_a_replica_killed_mid_load_fails_only_its_requests_and_is_replaced(cluster: RayCluster) -> None:
    before = cluster.replica_actors()
    assert len(before) == 2
    clients = 8
    started = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_generate, cluster.stub, [k], 400, started) for k in range(clients)]
        started.wait(120)  # every request is sampling somewhere
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        outcomes = [future.result(300) for future in futures]
    failed = [(events, error) for events, error in outcomes if error is not None]
    succeeded = [events for events, error in outcomes if error is None]
    print("codes:", [(e.code(), e.details()[:120]) for _, e in failed])
    assert failed, "the killed replica held none of the requests"
    assert succeeded, "no request reached the surviving replica"
    for events in succeeded:
        assert len(_raw(events)) == 1  # success means an image
    for events, error in failed:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert not _raw(events)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = cluster.replica_actors()
        if len(now) == 2 and before[0] not in now and cluster.replicas().get("RUNNING") == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {cluster.replica_actors()} {cluster.replicas()}")
    events, error = _generate(cluster.stub, [99], 4)
    assert error is None
    assert len(_raw(events)) == 1


def test_a_model_that_fails_to_load_fails_health_checks_and_spares_the_other_application(
    cluster: RayCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "models.toml").write_text('[[models]]\nname = "broken"\nsource = "no-such-folder"\n')
    options = ray_app.ReplicaOptions(model="broken", overrides={"models_config": str(tmp_path / "models.toml")})
    sampler: Any = ray_app.SamplerDeployment  # a serve.Deployment once decorated (mypy sees the class)
    deployment = sampler.options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=1.0, max_constructor_retry_count=2
    )
    target = serve.RunTarget(deployment.bind(options), name="broken", route_prefix="/broken")
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    broken = (("application", "broken"),)
    try:
        deadline = time.monotonic() + 120
        seen: set[str] = set()
        while time.monotonic() < deadline and not seen & {"UNHEALTHY", "DEPLOY_FAILED"}:
            application = serve.status().applications.get("broken")
            if application is not None:
                seen.add(application.status.value)
                deployment = application.deployments.get(ray_app.DEPLOYMENT_NAME)
                if deployment is not None:
                    seen.add(deployment.status.value)
            time.sleep(0.5)
        print("states:", seen)
        assert seen & {"UNHEALTHY", "DEPLOY_FAILED"}, seen
        error = rpc_error(lambda: cluster.stub.Plan(request(model="broken"), metadata=broken))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        # its health, through the proxy: NOT_SERVING (exit 1); the proxy's own health stays SERVING,
        # answered by the proxy (two applications now: routing would need the metadata)
        capsys.readouterr()
        assert client_main(["--target", cluster.target, "--ray", "health", "--service", "broken"]) == 1
        said = capsys.readouterr()
        assert said.out.strip() == "NOT_SERVING", said.err
        assert client_main(["--target", cluster.target, "--ray", "health"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        # the other application serves on, all replicas healthy
        assert serve.status().applications["mnist"].status == "RUNNING"
        events, failure = _generate(cluster.stub, [5], 4)
        assert failure is None
        assert len(_raw(events)) == 1
    finally:
        serve.delete("broken", _blocking=True)


def test_the_bearer_token_is_checked_by_the_replica(cluster: RayCluster) -> None:
    """Ray's proxy runs no interceptors: a replica whose settings set a token checks it itself."""
    options = ray_app.ReplicaOptions(model="mnist", overrides={"auth_token": "s3cret", "warmup": False})
    sampler: Any = ray_app.SamplerDeployment  # a serve.Deployment once decorated (mypy sees the class)
    deployment = sampler.options(num_replicas=1, ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(options), name="secured", route_prefix="/secured")
    secured = (("application", "secured"),)
    try:
        wrong = (*secured, ("authorization", "Bearer no"))
        for metadata, text in ((secured, "missing bearer token"), (wrong, "wrong bearer token")):
            for call in (
                lambda metadata=metadata: cluster.stub.Plan(request(), metadata=metadata),
                lambda metadata=metadata: list(cluster.stub.Generate(request(), metadata=metadata)),
            ):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert text in error.details()
        plan = cluster.stub.Plan(request(), metadata=(*secured, ("authorization", "Bearer s3cret")))
        assert plan.nfe == 4
    finally:
        serve.delete("secured", _blocking=True)


# Which of Ray's processes reads each of `ray_app.LEAN_ENVIRONMENT`'s settings, by what its command
# line contains: the test below checks that the setting reaches them.
LEAN_READERS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": ("ray::ServeController",),
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": ("ray/_private/log_monitor.py",),
    "RAY_USAGE_STATS_ENABLED": ("ray/dashboard/dashboard.py",),  # its usage module reports
}


def test_the_lean_settings_reach_the_processes_ray_starts(cluster: RayCluster) -> None:
    """Each of `ray_app.LEAN_ENVIRONMENT`'s settings (the controller's loop period, the log
    monitor's scan for new files, ...) is in the environment of the processes of a head started
    after `lean_environment()` that read it, not just in this one's. The measured savings are in
    bench/results/serve-load-ray-lean."""
    import psutil

    assert set(LEAN_READERS) == set(ray_app.LEAN_ENVIRONMENT)  # a new setting names its readers here
    environments: dict[str, dict[str, str]] = {}
    for process in psutil.Process().children(recursive=True):
        try:  # the replica killed by another test may linger as a zombie
            environments[f"{process.pid} {' '.join(process.cmdline())}"] = process.environ()
        except psutil.Error:
            continue
    for key, value in ray_app.LEAN_ENVIRONMENT.items():
        for reader in LEAN_READERS[key]:
            lines = [line for line in environments if reader in line]
            assert lines, (reader, sorted(environments))
            for line in lines:
                assert environments[line].get(key) == value, (line, key)


def test_the_replica_logs_each_request_as_the_server_does(cluster: RayCluster) -> None:
    """With Ray's access log off (deploy/ray/serve.yaml), the request log is the service's own:
    the replica writes its JSON line (request id, method, code) to its log file under Ray's
    session folder, which Ray's log monitor forwards to the driver."""
    import json

    request_id = f"log-check-{time.monotonic_ns()}"
    cluster.stub.GenerateUnary(request(steps=2, request_id=request_id), metadata=APPLICATION)
    # Ray's node object knows its session's log folder (no public API without the dashboard).
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [
            line
            for path in logs.glob("worker-*.err")
            for line in path.read_text(errors="replace").splitlines()
            if request_id in line
        ]
        if lines:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replica log line with request_id {request_id} under {logs}")
    records = [json.loads(line[line.index("{") :]) for line in lines]
    assert any(r["method"] == "GenerateUnary" and r["code"] == "OK" for r in records), records


def test_the_shipped_configs_are_valid_serve_configs() -> None:
    """deploy/ray/serve.yaml and the RayService's embedded config: Ray's schema, our proxy hook,
    our application arguments, the models config they name."""
    import yaml

    from models.config import read_models_config

    local = ray_app.read_config(SERVE_CONFIG)
    (manifest,) = [
        d
        for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())
        if d["kind"] == "RayService"
    ]
    cluster = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert cluster.grpc_options.grpc_servicer_functions == [ray_app.SERVICER_FUNCTION]
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    (head,) = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in head["env"]} == ray_app.LEAN_ENVIRONMENT  # where the controller runs
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:  # log monitors run on every node
        (worker,) = group["template"]["spec"]["containers"]
        assert ray_app.LEAN_ENVIRONMENT.items() <= {e["name"]: e["value"] for e in worker["env"]}.items()
    for config in (local, cluster):
        assert config.logging_config is not None
        assert config.logging_config.enable_access_log is False  # the replicas log each request
        for application in config.applications:
            options = ray_app.ReplicaOptions.model_validate(application.args)
            assert application.name == options.model
            (deployment,) = application.deployments
            assert deployment.name == ray_app.DEPLOYMENT_NAME
    (gpu,) = cluster.applications[0].deployments
    assert gpu.ray_actor_options.num_gpus == 1
    models_config = ray_app.ReplicaOptions.model_validate(local.applications[0].args).overrides["models_config"]
    assert [m.name for m in read_models_config(Path(models_config)).models] == ["mnist"]


def test_sampler_service_ray_names_a_bad_config_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sampler_service.__main__ import main as service_main

    assert service_main(["ray", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    config = tmp_path / "serve.yaml"
    text = SERVE_CONFIG.read_text().replace(ray_app.SERVICER_FUNCTION, "some.module:add_servicer")
    config.write_text(text)
    assert service_main(["ray", "--config", str(config)]) == 2
    assert f"must list {ray_app.SERVICER_FUNCTION}" in capsys.readouterr().err
    config.write_text(SERVE_CONFIG.read_text().replace("torch_threads: 1", "torch_threads: 0"))
    assert service_main(["ray", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "application 'mnist'" in error
    assert "torch_threads" in error
    assert "greater than or equal to 1" in error


def test_zz_drain_finishes_the_requests_in_flight(cluster: RayCluster) -> None:
    """`ray_app.drain` (what SIGTERM to `sampler-service ray` does) lets requests in flight finish."""
    clients = 4
    started = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_generate, cluster.stub, [k], 300, started) for k in range(clients)]
        started.wait(120)
        ray_app.drain(cluster.config)
        outcomes = [future.result(300) for future in futures]
    for events, error in outcomes:
        assert error is None, error.details()
        assert len(_raw(events)) == 1
    assert "mnist" not in serve.status().applications
