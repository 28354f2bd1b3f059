"""deploy/kubernetes and deploy/compose: the pod, its Redis and the compose file, as an operator
checks them: kubernetes-validate (strict, Kubernetes 1.29 and the newest schema it ships), checkov,
and what the tools cannot see: the native sidecar's ordering and probes, the drain arithmetic,
the hardening of every container, secrets as files, the Redis the URL points at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    COMPOSE,
    KUBERNETES,
    REPO,
    find_tool,
    free_port,
    http_get,
    load_documents,
    manifests,
    resource,
    resources,
    run_tool,
)

# Native sidecars (restartPolicy: Always on an init container) are on by default from 1.29.
MINIMUM_KUBERNETES = "1.29.0"


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"])
        for r in resources()
        if r["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}
    ]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def sidecar_pod() -> dict[str, Any]:
    pod: dict[str, Any] = resource("Deployment", "product-api")["spec"]["template"]["spec"]
    return pod


def quota_sidecar() -> dict[str, Any]:
    sidecars: list[dict[str, Any]] = [
        c for c in sidecar_pod()["initContainers"] if c["name"] == "quota-sidecar"
    ]
    [sidecar] = sidecars
    return sidecar


def readme_settings() -> set[str]:
    return set(re.findall(r"`(SIDECAR_[A-Z_]+)`", (REPO / "README.md").read_text()))


# --- The native sidecar --------------------------------------------------------------------------


def test_quota_sidecar_is_a_native_sidecar_started_before_the_app() -> None:
    pod = sidecar_pod()
    sidecar = quota_sidecar()
    assert sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert env(sidecar)["SIDECAR_UPSTREAM"] == "http://127.0.0.1:8080"
    assert {p["containerPort"] for p in pod["containers"][0]["ports"]} == {8080}


def test_the_probes_ask_the_admin_port_readyz_to_start_and_serve_and_healthz_to_live() -> None:
    sidecar = quota_sidecar()
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    admin_port = int(env(sidecar)["SIDECAR_ADMIN"].rpartition(":")[2])
    assert ports["admin"] == admin_port
    assert int(env(sidecar)["SIDECAR_LISTEN"].rpartition(":")[2]) == ports["proxy"]
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}, probe
    startup = sidecar["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, (
        "too little time for Redis to come up"
    )


def test_the_grace_period_outlasts_the_app_prestop_and_the_sidecar_drain() -> None:
    pod = sidecar_pod()
    drain = float(env(quota_sidecar())["SIDECAR_DRAIN_TIMEOUT"])
    [app] = pod["containers"]
    prestop = float(app["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + prestop


def test_the_service_and_the_disruption_budget_select_the_pods_and_reach_the_proxy_port() -> None:
    deployment = resource("Deployment", "product-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service", "product-api")
    budget = resource("PodDisruptionBudget", "product-api")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["proxy"]
    policy = resource("NetworkPolicy", "product-api")
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert admitted == {8000, 9000}, "only the sidecar's ports are reachable from outside the pod"


def test_the_sidecar_data_dir_is_an_emptydir_and_the_policies_a_configmap() -> None:
    sidecar = quota_sidecar()
    volumes = {v["name"]: v for v in sidecar_pod()["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[env(sidecar)["SIDECAR_DATA_DIR"]]]
    policies = volumes[mounts[env(sidecar)["SIDECAR_POLICIES"]]]
    assert resource("ConfigMap", policies["configMap"]["name"])


def test_the_policy_in_the_configmap_is_one_the_sidecar_accepts(tmp_path: Path) -> None:
    configmap = resource("ConfigMap", "quota-policies")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- Hardening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", [name for name, _ in pod_specs()])
def test_every_container_is_hardened_and_bounded(workload: str) -> None:
    pod = dict(pod_specs())[workload]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in containers(pod):
        where = f"{workload} {container['name']}"
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] >= 10000 and context["runAsGroup"] >= 10000, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where} {bound}"
        assert re.search(r"@sha256:[0-9a-f]{64}$", container["image"]), f"{where}: image not pinned by digest"
        assert container["imagePullPolicy"] == "Always", where


def test_secrets_reach_containers_as_files_only() -> None:
    for workload, pod in pod_specs():
        for container in containers(pod):
            for item in container.get("env", []):
                assert "secretKeyRef" not in item.get("valueFrom", {}), f"{workload} {container['name']}"
            assert not any("secretRef" in source for source in container.get("envFrom", []))
    secret_volumes = {
        v["secret"]["secretName"] for _, pod in pod_specs() for v in pod["volumes"] if "secret" in v
    }
    assert secret_volumes == {"quota-sidecar", "quota-redis"}


def test_each_secret_key_names_a_setting_the_readme_documents() -> None:
    settings = readme_settings()
    secret = resource("Secret", "quota-sidecar")
    for key in secret["stringData"]:
        assert "SIDECAR_" + key.upper().replace("-", "_") in settings, key
    for name in env(quota_sidecar()):
        assert name == "SECRETS_DIR" or name in settings, name


def test_the_sidecar_command_turns_each_secret_file_into_its_setting(tmp_path: Path) -> None:
    """The container's shell command, run here with a stand-in `sidecar` that prints what it got."""
    sidecar = quota_sidecar()
    assert sidecar["command"] == ["/bin/sh", "-c"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin-token").write_text("s3cret token\n")
    (secrets / "redis-url").write_text("redis://:pw@quota-redis-0.quota-redis:6379/0")
    (secrets / "..data").mkdir()  # what the kubelet's atomic writer leaves beside the keys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sidecar"
    fake.write_text('#!/bin/sh\necho "args=$*"\nenv | grep ^SIDECAR_ | sort\n')
    fake.chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", "-c", sidecar["args"][0]],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SECRETS_DIR": str(secrets)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "args=run",
        "SIDECAR_ADMIN_TOKEN=s3cret token",
        "SIDECAR_REDIS_URL=redis://:pw@quota-redis-0.quota-redis:6379/0",
    ]
    assert env(sidecar)["SECRETS_DIR"] in {m["mountPath"] for m in sidecar["volumeMounts"]}


# --- Its Redis -----------------------------------------------------------------------------------


def test_the_redis_url_points_at_the_statefulsets_headless_service() -> None:
    statefulset = resource("StatefulSet", "quota-redis")
    service = resource("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    url = resource("Secret", "quota-sidecar")["stringData"]["redis-url"]
    host = f"{statefulset['metadata']['name']}-0.{service['metadata']['name']}"
    assert re.fullmatch(rf"redis://:[^@]+@{re.escape(host)}:6379/0", url), url
    assert url.split(":")[2].split("@")[0] == resource("Secret", "quota-redis")["stringData"]["password"]


def test_redis_persists_to_a_claim_with_an_append_only_file_and_never_evicts() -> None:
    statefulset = resource("StatefulSet", "quota-redis")
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    [redis] = statefulset["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    config = dict(
        line.split(None, 1)
        for line in resource("ConfigMap", "quota-redis")["data"]["redis.conf"].splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert config["dir"] == "/data" and config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"
    assert "--requirepass" in redis["args"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "ping" in " ".join(redis[probe]["exec"]["command"]), probe


def test_the_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifests()]
    namespaces = {r["metadata"].get("namespace") for r in resources() if r["kind"] != "Namespace"}
    assert (
        namespaces == {kustomization["namespace"]} == {resource("Namespace", "product")["metadata"]["name"]}
    )


# --- kubernetes-validate and checkov -------------------------------------------------------------


@pytest.mark.parametrize("version", [MINIMUM_KUBERNETES, "newest"])
def test_kubernetes_validate_accepts_every_manifest(version: str) -> None:
    tool = find_tool("kubernetes-validate")
    argv = [tool, "--strict", *([] if version == "newest" else ["-k", version]), *map(str, manifests())]
    done = run_tool(argv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr and "WARN" not in done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(resources())


def test_kubernetes_validate_refuses_a_misspelt_field(tmp_path: Path) -> None:
    """The strict schema check is real: the pod with one field misspelt fails."""
    tool = find_tool("kubernetes-validate")
    deployment = resource("Deployment", "product-api")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolcy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    done = run_tool([tool, "--strict", "-k", MINIMUM_KUBERNETES, str(path)])
    assert done.returncode != 0 and "restartPolcy" in done.stdout + done.stderr


def checkov(*args: str) -> dict[str, Any]:
    tool = find_tool("checkov")
    done = run_tool([tool, *args, "--quiet", "--compact", "--skip-download", "--output", "json"])
    assert done.stdout.strip(), done.stderr
    report: dict[str, Any] | list[dict[str, Any]] = json.loads(done.stdout)
    if isinstance(report, list):  # one report per framework
        [report] = report
    return report


def failed_checks(report: dict[str, Any]) -> list[str]:
    results = report.get("results", {})
    return [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in results.get("failed_checks", [])]


def test_checkov_passes_on_deploy_kubernetes() -> None:
    report = checkov("--directory", str(KUBERNETES), "--framework", "kubernetes")
    assert not failed_checks(report), "\n".join(failed_checks(report))
    summary = report["summary"]
    assert summary["passed"] >= 150, summary
    skipped = report["results"].get("skipped_checks", [])
    assert all(check.get("suppress_comment") for check in skipped), "a skip without its reason"


def test_checkov_sees_the_native_sidecar(tmp_path: Path) -> None:
    """checkov reads init containers: the sidecar loosened fails the checks that hold it."""
    documents = load_documents(KUBERNETES / "sidecar.yaml")
    for document in documents:
        if document["kind"] == "Deployment":
            context = document["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]
            context["readOnlyRootFilesystem"] = False
            context["allowPrivilegeEscalation"] = True
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump_all(documents))
    failed = " ".join(failed_checks(checkov("--directory", str(tmp_path), "--framework", "kubernetes")))
    assert "CKV_K8S_22" in failed and "CKV_K8S_20" in failed, failed


# --- Compose -------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return spec


def services(kind: str) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items() if name.startswith(kind)}


def test_compose_starts_redis_then_each_sidecar_then_its_app() -> None:
    sidecars, apps = services("sidecar-"), services("app-")
    assert len(sidecars) == len(apps) >= 2
    redis = compose()["services"]["redis"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    for name, sidecar in sidecars.items():
        assert sidecar["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        assert "/readyz" in " ".join(sidecar["healthcheck"]["test"]), name
        assert sidecar["environment"]["SIDECAR_REDIS_URL"].startswith("redis://redis:6379"), name
        assert sidecar["environment"]["SIDECAR_UPSTREAM"] == "http://127.0.0.1:8080", name
        drain = float(sidecar["environment"]["SIDECAR_DRAIN_TIMEOUT"])
        assert float(sidecar["stop_grace_period"].rstrip("s")) > drain, name
        assert all(port.startswith("127.0.0.1:") for port in sidecar["ports"]), name
    for name, app in apps.items():
        partner = "sidecar-" + name.removeprefix("app-")
        assert app["network_mode"] == f"service:{partner}", name
        assert app["depends_on"] == {partner: {"condition": "service_healthy"}}, name
        assert "/healthz" in " ".join(app["healthcheck"]["test"]), name


def test_compose_hardens_every_service() -> None:
    for name, service in compose()["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        uid = service["user"].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, name
        assert "healthcheck" in service, name
    for name, sidecar in services("sidecar-").items():
        assert any(mount.startswith("/data:uid=10001") for mount in sidecar["tmpfs"]), name


def test_the_compose_demo_app_serves_and_its_health_check_passes(tmp_path: Path) -> None:
    """The demo API's inline code and its health check, run here on a free loopback port."""
    [app] = list(services("app-").values())[:1]
    port = str(free_port())
    code = app["entrypoint"][2].replace("port=8080", f"port={port}")
    assert app["entrypoint"][:2] == ["python", "-c"] and port in code
    check = [
        sys.executable if part == "python" else part.replace(":8080/", f":{port}/")
        for part in app["healthcheck"]["test"][1:]
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(check, capture_output=True, timeout=10, check=False).returncode != 0:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the demo app's health check never passed"
            time.sleep(0.1)
        status, body = http_get(f"http://127.0.0.1:{port}/hello", headers={"X-Customer-Id": "demo"})
        assert status == 200 and json.loads(body)["customer"] == "demo"
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr:
            process.stderr.close()
