"""The deployment files, checked by reading them: no container engine runs here.

Every setting they pass is one the service reads, every command one the `loop` CLI has, every
reference (volumes, dependencies, ConfigMaps, Secrets, probe ports, selectors) points at
something defined, and every long-running container has a health check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from service.cli import main
from service.settings import Settings

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTINGS = {f"LOOP_{name.upper()}" for name in Settings.model_fields} | {"BENTOML_HOME"}


def check_command(command: list[str]) -> None:
    """`loop SUB [options]` names a real subcommand and real options of it."""
    assert command[0] == "loop", command
    sub = main.commands[command[1]]
    options = {
        opt for param in sub.params if isinstance(param, click.Option) for opt in param.opts + param.secondary_opts
    }
    assert all(arg in options for arg in command[2:] if arg.startswith("--")), command


def check_env(names: set[str]) -> None:
    unknown = sorted(n for n in names if n.startswith(("LOOP_", "BENTOML_HOME")) and n not in SETTINGS)
    assert unknown == [], f"settings the service does not read: {unknown}"


def test_the_compose_file_runs_the_whole_loop_with_health_checks() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    assert {"postgres", "redis", "service", "ingest", "mlflow", "migrate"} <= set(services)
    declared = set(compose["volumes"])
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            assert volume.split(":")[0] in declared, (name, volume)
        for dependency in spec.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        if name != "migrate":
            assert "healthcheck" in spec and spec["healthcheck"]["test"], f"{name} has no health check"
        if spec.get("image", "").startswith("loop"):
            check_command(spec["command"])
            check_env(set(spec["environment"]))
    assert services["service"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "--appendonly" in services["redis"]["command"]  # the stream survives a restart


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_the_kubernetes_manifests_are_consistent() -> None:
    docs = _documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    check_env(set(config["data"]) | set(secret["stringData"]))
    assert "LOOP_DATABASE_URL" in secret["stringData"] and "LOOP_DATABASE_URL" not in config["data"]
    deployments = [d for d in docs if d["kind"] == "Deployment" and _image(d).startswith("loop:")]
    assert {d["metadata"]["name"] for d in deployments} == {"loop-service", "loop-ingest"}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for container in spec["template"]["spec"]["containers"]:
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
            ports = {p["name"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, (deployment["metadata"]["name"], probe)
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            check_command(container["command"])
            check_env({e["name"] for e in container.get("env", [])})
            for source in container["envFrom"]:
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in kinds
    gpu = [
        d
        for d in deployments
        if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert (
        len(gpu) == 1
        and {"name": "LOOP_DEVICE", "value": "cuda"} in gpu[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    )
    every = [d for d in docs if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert any(service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in every)  # fmt: skip


def _image(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def test_the_remote_inference_variant_sends_the_service_to_triton_over_one_repository() -> None:
    """The service's engine is Triton's gRPC Service; both mount one claim, the service where it
    writes the repository (LOOP_INFERENCE_REPOSITORY), Triton where it reads it, in explicit mode."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "service-remote.yaml").read_text()) if d]
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    service, triton = named[("Deployment", "loop-service")], named[("Deployment", "loop-triton")]
    claim = named[("PersistentVolumeClaim", "loop-model-repository")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    def mount(deployment: dict[str, Any]) -> dict[str, Any]:
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = [
            v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "loop-model-repository"
        ]
        (found,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        return dict(found)

    env = {e["name"]: e["value"] for e in service["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = Settings(**{k.removeprefix("LOOP_").lower(): v for k, v in env.items() if k.startswith("LOOP_INF")})
    assert settings.engine is not None and settings.engine.protocol == "grpc"
    host, port = settings.engine.address.split(":")
    triton_service = named[("Service", host)]
    assert triton_service["spec"]["selector"].items() <= triton["spec"]["template"]["metadata"]["labels"].items()
    (grpc,) = [p for p in triton_service["spec"]["ports"] if p["port"] == int(port)]
    assert grpc["targetPort"] in {p["name"] for p in triton["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert str(settings.inference_repository) == mount(service)["mountPath"] and not mount(service).get("readOnly")
    args = triton["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--model-repository={mount(triton)['mountPath']}" in args and "--model-control-mode=explicit" in args
    assert "nvidia.com/gpu" in triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


KUBERNETES = "1.37"  # the release whose OpenAPI schemas (shipped by kubernetes-validate) the manifests meet


def test_every_manifest_is_valid_for_kubernetes_strictly() -> None:
    import kubernetes_validate

    own = [d for d in _documents() if not d["apiVersion"].startswith("keda.sh/")]
    assert len(own) >= 10
    for document in own:  # strict: a misspelt or misplaced field is an error, as `kubectl --validate=strict`
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    deployment = next(d for d in own if d["kind"] == "Deployment")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES, strict=True)


def test_the_autoscalers_and_budgets_name_what_runs() -> None:
    from feedback.keys import INGEST_GROUP, Keys

    docs = _documents()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "loop-service"
    assert deployments["loop-service"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    for budget in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        labels = deployments[budget["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # KEDA's ScaledObject is a custom resource (no Kubernetes schema): checked against the stream
    # and group `loop ingest` really reads, and the Redis the pods are given.
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["spec"]["scaleTargetRef"]["name"] == "loop-ingest"
    (trigger,) = scaled["spec"]["triggers"]
    redis = config["LOOP_REDIS_URL"].removeprefix("redis://").split("/")[0]
    assert trigger["type"] == "redis-streams" and trigger["metadata"]["address"] == redis
    assert trigger["metadata"]["stream"] == Keys(config["LOOP_REDIS_PREFIX"]).stream
    assert trigger["metadata"]["consumerGroup"] == INGEST_GROUP
    assert int(trigger["metadata"]["lagCount"]) > 0
