"""Every object the builders produce validates (kubernetes-validate, strict) and is locked down."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import re
from typing import Any

import pytest

from api.instances.providers.kubernetes import manifests, names
from api.instances.providers.kubernetes.manifests import ClusterConfig, ManifestError
from api.schemas import services_digest
from api.settings import Settings
from tests.k8s.conftest import make_spec, validate_strict

SERVICES = [
    {"name": "postgres", "image": "postgres:16.4", "env": {"POSTGRES_PASSWORD": "dev"}, "ports": [5432],
     "health": {"command": "pg_isready -U postgres", "interval": "5s", "timeout": 3, "retries": 5}},
    {"name": "redis", "image": "redis:7.4", "ports": [6379],
     "health": {"command": ["redis-cli", "ping"], "interval": "1m"}},
    {"name": "mailhog", "image": "mailhog/mailhog:v1.0.1", "ports": [1025, 8025]},
]
MATRIX = list(itertools.product(
    ["small", "medium", "large"],
    [(), SERVICES],
    [{}, {"GITHUB_TOKEN": "ghp_x", "OPENAI_API_KEY": "sk-x"}],
    [None, {"cpu": "500m", "memory": "1Gi"}, {"cpu": "3", "memory": "12Gi", "gpu": "1"}],
))
OWNER = "6b1f5d4e-0000-4000-8000-000000000001"
CONFIG = ClusterConfig(storage_class="fast-ssd")


@pytest.mark.parametrize(("tier", "services", "secrets", "override"), MATRIX)
def test_matrix_validates_strict(tier: str, services: Any, secrets: dict[str, str], override: Any) -> None:
    spec = make_spec(tier=tier, services=services, secret_env=secrets, resources=override)
    objects = manifests.build(spec, CONFIG, generation=3, owner_uid=OWNER)
    for obj in objects.all():
        validate_strict(obj)
        meta = obj["metadata"]
        assert meta["namespace"] == CONFIG.namespace
        assert meta["labels"][names.SESSION_LABEL] == spec.session_id
        assert meta["labels"][names.ORG_LABEL] == spec.org_id
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in meta["labels"]
    runner = objects.pod["spec"]["containers"][0]
    assert runner["resources"]["limits"]["cpu"] == (override or {}).get("cpu", {"small": "2", "medium": "4",
                                                                                 "large": "8"}[tier])
    assert len(objects.pod["spec"]["containers"]) == 1 + len(services)


def test_owner_references_point_at_the_root_everywhere_but_the_root() -> None:
    objects = manifests.build(make_spec(), CONFIG, owner_uid=OWNER)
    assert "ownerReferences" not in objects.root["metadata"]
    for obj in (objects.secret, objects.pvc, objects.network_policy, objects.pod):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "v1", "kind": "ConfigMap", "name": objects.root["metadata"]["name"],
                       "uid": OWNER, "blockOwnerDeletion": False}


def test_without_owner_there_are_no_owner_references() -> None:
    for obj in manifests.build(make_spec(), CONFIG).all():
        assert "ownerReferences" not in obj["metadata"]
        validate_strict(obj)


def test_pod_security() -> None:
    pod = manifests.pod(make_spec(services=SERVICES), CONFIG)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in spec and "hostPID" not in spec
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["privileged"] is False
    runner = spec["containers"][0]
    assert runner["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in runner["volumeMounts"]}
    assert mounts["/workspace"] == "workspace" and mounts["/tmp"] == "tmp" and mounts["/home/orzbob"] == "home"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == names.pvc_name("brave-otter-42")
    assert "emptyDir" in volumes["tmp"] and "emptyDir" in volumes["home"]


def test_every_container_has_a_node_disk_limit() -> None:
    """A session may not fill its node's disk (a sidecar's writable layer, output, /tmp): every container
    has an ephemeral-storage request and limit, so the kubelet evicts that Pod and no other."""
    pod = manifests.pod(make_spec(services=SERVICES), CONFIG)
    validate_strict(pod)
    total = 0
    for container in pod["spec"]["containers"]:
        res = container["resources"]
        assert "ephemeral-storage" in res["requests"], container["name"]
        limit = res["limits"]["ephemeral-storage"]
        assert limit.endswith("Gi"), limit
        total += int(limit[:-2])
    # The runner's emptyDirs fit in its own limit; the Pod as a whole stays far below a node's disk.
    runner_limit = int(pod["spec"]["containers"][0]["resources"]["limits"]["ephemeral-storage"][:-2])
    empty_dirs = sum(int(v["emptyDir"]["sizeLimit"][:-2]) for v in pod["spec"]["volumes"]
                     if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    assert empty_dirs < runner_limit
    assert total <= 6 + 3 * 4


def test_runner_container_contract() -> None:
    spec = make_spec(secret_env={"GITHUB_TOKEN": "ghp_secret"})
    pod = manifests.pod(spec, CONFIG)
    runner = pod["spec"]["containers"][0]
    assert runner["name"] == "runner"
    assert runner["command"] == ["orz", "runner"]
    assert runner["image"] == CONFIG.runner_image
    assert runner["ports"] == [{"name": "ssh", "containerPort": 2222, "protocol": "TCP"}]
    assert runner["envFrom"] == [{"secretRef": {"name": names.secret_name(spec.session_id)}}]
    env = {e["name"]: e.get("value") for e in runner["env"]}
    runner_spec = json.loads(env["ORZ_RUNNER_SPEC"])
    advertise = next(e for e in runner["env"] if e["name"] == "ORZ_RUNNER_ADVERTISE_HOST")
    assert advertise["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # runner_fast_path reaches the runner in its environment: older runner images refuse unknown spec fields.
    assert env["ORZ_RUNNER_FAST_PATH"] == "true" and "fast_path" not in runner_spec
    off = manifests.pod(spec, dataclasses.replace(CONFIG, runner_fast_path=False))["spec"]["containers"][0]
    assert {"name": "ORZ_RUNNER_FAST_PATH", "value": "false"} in off["env"]
    assert runner_spec["session_id"] == spec.session_id
    assert runner_spec["secret_env"] == ["GITHUB_TOKEN"]
    assert runner_spec["ssh_port"] == 2222 and runner_spec["workspace"] == "/workspace"
    # The pane's text is kept on the workspace volume (a stop deletes the Pod and its emptyDir state dir).
    mounts = {m["name"]: m["mountPath"] for m in runner["volumeMounts"]}
    assert runner_spec["scrollback_file"].startswith(mounts["workspace"] + "/.git/")
    assert not runner_spec["scrollback_file"].startswith(mounts["state"])
    # No secret value anywhere in the Pod.
    text = json.dumps(pod)
    assert spec.runner_token not in text and "ghp_secret" not in text
    assert "ORZ_RUNNER_TOKEN" not in env


def test_secret_carries_token_and_secret_env() -> None:
    spec = make_spec(secret_env={"GITHUB_TOKEN": "ghp_secret"})
    secret = manifests.secret(spec, CONFIG)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"ORZ_RUNNER_TOKEN": spec.runner_token, "GITHUB_TOKEN": "ghp_secret"}
    assert "ghp_secret" not in json.dumps(manifests.redacted(secret))
    with pytest.raises(ManifestError, match="ORZ_RUNNER_TOKEN"):
        manifests.secret(make_spec(secret_env={"ORZ_RUNNER_TOKEN": "x"}), CONFIG)


def test_sidecar_probes_and_ports() -> None:
    pod = manifests.pod(make_spec(services=SERVICES), CONFIG)
    pg, redis, mail = pod["spec"]["containers"][1:]
    assert pg["readinessProbe"]["exec"]["command"] == ["sh", "-c", "pg_isready -U postgres"]
    assert pg["readinessProbe"]["periodSeconds"] == 5
    assert pg["readinessProbe"]["timeoutSeconds"] == 3
    assert pg["readinessProbe"]["failureThreshold"] == 5
    assert pg["livenessProbe"]["initialDelaySeconds"] == 25
    assert pg["env"] == [{"name": "POSTGRES_PASSWORD", "value": "dev"}]
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert redis["readinessProbe"]["periodSeconds"] == 60
    assert "readinessProbe" not in mail and [p["containerPort"] for p in mail["ports"]] == [1025, 8025]


def kubelet_env(container: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    """The env a container sees: secretKeyRefs read, then $(VAR) and $$ expanded as the kubelet does."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "valueFrom" in var:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
            continue
        value, out, i = var["value"], "", 0
        while i < len(value):
            if value[i] == "$" and i + 1 < len(value):
                if value[i + 1] == "$":
                    out, i = out + "$", i + 2
                    continue
                end = value.find(")", i)
                if value[i + 1] == "(" and end > 0:
                    name = value[i + 2:end]
                    out, i = out + env.get(name, f"$({name})"), end + 1
                    continue
            out, i = out + value[i], i + 1
        env[var["name"]] = out
    return env


def test_secret_references_become_secret_key_refs_and_text_stays_as_written() -> None:
    services = [{"name": "db", "image": "postgres:16", "ports": [5432], "env": {
        "POSTGRES_PASSWORD": "${PG_PASSWORD}",
        "DATABASE_URL": "pg://app:${PG_PASSWORD}@localhost/app?x=$(HOME)",
        "LITERAL": "pa$word $(POSTGRES_PASSWORD) $$",
    }}]
    spec = make_spec(services=services, secret_env={"PG_PASSWORD": "s3cret", "OTHER": "other-value"})
    pod = manifests.pod(spec, CONFIG)
    validate_strict(pod)
    db = pod["spec"]["containers"][1]
    ref = {"secretKeyRef": {"name": names.secret_name(spec.session_id), "key": "PG_PASSWORD"}}
    assert db["env"] == [
        {"name": "ORZ_SECRET_PG_PASSWORD", "valueFrom": ref},
        {"name": "DATABASE_URL", "value": "pg://app:$(ORZ_SECRET_PG_PASSWORD)@localhost/app?x=$$(HOME)"},
        {"name": "LITERAL", "value": "pa$$word $$(POSTGRES_PASSWORD) $$$$"},
        {"name": "POSTGRES_PASSWORD", "valueFrom": ref},
    ]
    # What the sidecar sees is what the local runner resolves: the secret substituted, all else verbatim.
    seen = kubelet_env(db, {"PG_PASSWORD": "s3cret"})
    assert seen["POSTGRES_PASSWORD"] == "s3cret"
    assert seen["DATABASE_URL"] == "pg://app:s3cret@localhost/app?x=$(HOME)"
    assert seen["LITERAL"] == "pa$word $(POSTGRES_PASSWORD) $$"
    # No secret value in the Pod, and the sidecar gets neither the runner token nor unreferenced secrets.
    assert "s3cret" not in json.dumps(pod) and "other-value" not in json.dumps(pod)
    assert "envFrom" not in db


def test_durations_in_seconds_as_the_runner_reports_them() -> None:
    services = [{"name": "db", "image": "postgres:16", "env": {}, "ports": [5432],
                 "health": {"command": "pg_isready", "interval": 0.5, "timeout": 2.0, "retries": 5}}]
    db = manifests.pod(make_spec(services=services), CONFIG)["spec"]["containers"][1]
    probe = db["readinessProbe"]
    assert (probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"]) == (1, 2, 5)
    assert probe["exec"]["command"] == ["sh", "-c", "pg_isready"]


def test_the_runner_spec_says_the_pod_runs_the_services() -> None:
    services = [{"name": "db", "image": "postgres:16", "env": {}, "ports": [5432], "health": None}]
    for given in ((), services):
        runner = manifests.pod(make_spec(services=given), CONFIG)["spec"]["containers"][0]
        runner_spec = json.loads(next(e["value"] for e in runner["env"] if e["name"] == "ORZ_RUNNER_SPEC"))
        assert runner_spec["sidecars"] == "pod"
        assert runner_spec["pod_services_digest"] == services_digest(list(given))


def test_resources_from_tier_and_override() -> None:
    runner = manifests.pod(make_spec(tier="medium"), CONFIG)["spec"]["containers"][0]
    assert runner["resources"] == {"requests": {"cpu": "1000m", "memory": "8Gi", "ephemeral-storage": "1Gi"},
                                   "limits": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "6Gi"}}
    gpu = manifests.pod(make_spec(resources={"gpu": "2"}), CONFIG)
    res = gpu["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" == res["requests"]["nvidia.com/gpu"]
    assert gpu["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resources": {"cpu": "lots"}}, "resources.cpu"),
    ({"resources": {"memory": "4 GB"}}, "resources.memory"),
    ({"resources": {"gpu": "0.5"}}, "resources.gpu"),
    ({"resources": {"disk": "1Gi"}}, "resources.disk"),
    ({"tier": "huge"}, "tier"),
    ({"services": [{"name": "runner", "image": "x:1"}]}, "services.runner"),
    ({"services": [{"name": "bad name", "image": "x:1"}]}, "services.bad name"),
    ({"services": [{"name": "my_db", "image": "x:1"}, {"name": "My-DB", "image": "x:1"}]},
     "both become container name 'my-db'"),
    ({"services": [{"name": "db", "image": "x:1", "ports": [2222]}]}, "services.db.ports"),
    ({"services": [{"name": "db"}]}, "services.db.image"),
    ({"services": [{"name": "db", "image": "x:1", "health": {"command": 3}}]}, "services.db.health.command"),
    ({"services": [{"name": f"s{i}", "image": "x:1"} for i in range(6)]}, "at most 5"),
    ({"services": [{"name": "db", "image": "x:1", "env": {"A": "${NOPE}"}}]},
     ".orz/cloud.yaml: services.db.env.A: ${NOPE} is not one of this session's secrets"),
    ({"services": [{"name": "db", "image": "x:1", "env": {"ORZ_SECRET_K": "x", "B": "-${K}-"}}],
      "secret_env": {"K": "v"}}, "services.db.env.ORZ_SECRET_K: names starting ORZ_SECRET_ are reserved"),
    ({"services": [{"name": "db", "image": "x:1", "health": {"command": "x", "interval": 0}}]},
     "services.db.health.interval: must be more than 0 seconds"),
    ({"secret_env": {"NOT VALID": "x"}}, "secret env names"),
    ({"session_id": "Not_A_Session"}, "runner spec is not valid (session_id)"),
])
def test_bad_specs_raise_manifest_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        manifests.build(make_spec(**kwargs), CONFIG)


def test_services_accept_the_cloud_yaml_mapping_form() -> None:
    spec = make_spec(services={"db": {"image": "postgres:16", "ports": [5432]}})  # type: ignore[arg-type]
    pod = manifests.pod(spec, CONFIG)
    assert pod["spec"]["containers"][1]["name"] == "db"
    validate_strict(pod)


def test_network_policy_admits_only_the_gateway_on_the_ssh_port() -> None:
    config = ClusterConfig.from_settings(Settings(
        k8s_gateway_selector="app.kubernetes.io/name=orzbob-cloud,app.kubernetes.io/component=gateway",
        k8s_gateway_namespace_selector="kubernetes.io/metadata.name=orz-system",
    ))
    policy = manifests.network_policy(make_spec(), config)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress open
    assert spec["podSelector"]["matchLabels"][names.SESSION_LABEL] == "brave-otter-42"
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "orz-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "orzbob-cloud",
                                        "app.kubernetes.io/component": "gateway"}},
    }
    assert rule["ports"] == [{"protocol": "TCP", "port": 2222}]
    # The policy selects exactly the session's runner pod.
    pod_labels = manifests.pod(make_spec(), config)["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    other = manifests.pod(make_spec("other-session"), config)["metadata"]["labels"]
    assert not spec["podSelector"]["matchLabels"].items() <= other.items()


def test_pvc_size_and_storage_class() -> None:
    pvc = manifests.pvc(make_spec(), ClusterConfig(workspace_size="20Gi"))
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert "storageClassName" not in pvc["spec"]
    assert manifests.pvc(make_spec(), CONFIG)["spec"]["storageClassName"] == "fast-ssd"


def test_builders_are_pure_and_deterministic() -> None:
    spec = make_spec(services=SERVICES, secret_env={"A": "b"})
    assert manifests.build(spec, CONFIG, owner_uid=OWNER) == manifests.build(spec, CONFIG, owner_uid=OWNER)


def test_service_images_are_pulled_always_so_the_node_cache_is_no_way_around_credentials() -> None:
    """A node's image cache is shared: with IfNotPresent a session ran a private image another tenant pulled onto
    the node with credentials this session lacks. Always makes the kubelet ask the registry each time."""
    pod = manifests.pod(make_spec(services=SERVICES), ClusterConfig.from_settings(Settings()))
    validate_strict(pod)
    runner, *services = pod["spec"]["containers"]
    assert [c["imagePullPolicy"] for c in services] == ["Always"] * len(SERVICES)
    assert runner["imagePullPolicy"] == "IfNotPresent"  # the operator's own image
    # The operator may choose otherwise (an air-gapped mirror, say): a setting, still a valid Pod.
    relaxed = ClusterConfig.from_settings(Settings(k8s_service_image_pull_policy="IfNotPresent"))
    pod = manifests.pod(make_spec(services=SERVICES), relaxed)
    validate_strict(pod)
    assert {c["imagePullPolicy"] for c in pod["spec"]["containers"][1:]} == {"IfNotPresent"}
