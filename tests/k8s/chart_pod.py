"""A rendered container's settings and Secret files, as a kubelet would hand them to the process.

Small on purpose: env values and secretKeyRefs into the rendered Secret, and the container's Secret
volumes written (items and all) under a temporary directory that stands in for their mountPaths.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from api.settings import Settings


def rendered_secret(objs: list[dict[str, Any]]) -> dict[str, bytes]:
    """The chart's keys Secret; empty with secrets.existingSecret (then nothing of it is resolved)."""
    found = [o for o in objs if o["kind"] == "Secret"]
    return {k: base64.b64decode(v) for k, v in found[0]["data"].items()} if found else {}


def container_env(objs: list[dict[str, Any]], component: str, root: Path, container: str | None = None,
                  secrets: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """The env of `component`'s Deployment container, with its Secret volumes written under `root`.
    ``secrets`` stands in for Secrets the operator made (name -> key -> value) that env entries reference."""
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"
                 and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    pod = deploy["spec"]["template"]["spec"]
    candidates = pod["containers"] if container is None else [*pod.get("initContainers", []), *pod["containers"]]
    (c,) = [c for c in candidates if container in (None, c["name"])]
    secret = rendered_secret(objs)
    mounts: dict[str, str] = {}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        target = root / mount["name"]
        target.mkdir(parents=True)
        for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in secret]:
            if item["key"] in secret:
                (target / item["path"]).write_bytes(secret[item["key"]])
                (target / item["path"]).chmod(0o400)
        mounts[mount["mountPath"]] = str(target)
    env: dict[str, str] = {}
    for entry in c.get("env", []):
        if "value" in entry:
            value = entry["value"]
        elif (ref := entry.get("valueFrom", {}).get("secretKeyRef", {})).get("name") in (secrets or {}):
            value = (secrets or {})[ref["name"]][ref["key"]]
        elif ref.get("key") in secret:
            value = secret[ref["key"]].decode()
        else:
            continue
        for path, local in mounts.items():
            if value.startswith(path + "/"):
                value = local + value[len(path):]
        env[entry["name"]] = value
    return env


def settings_from(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings from ORZ_* names (the rendered env), with overrides (ports, data dir) on top."""
    fields = {name[4:].lower(): value for name, value in env.items()
              if name.startswith("ORZ_") and name[4:].lower() in Settings.model_fields}
    return Settings(**{**fields, **overrides})
