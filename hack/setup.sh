#!/usr/bin/env bash
# Set up a fresh machine for Orzbob Cloud: system tools (tmux, OpenSSH client, git, ...) and a
# virtualenv in .venv with the project and its test/dev dependencies. Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A wanted=(
  [tmux]=tmux [ssh]=openssh-client [sftp]=openssh-client [scp]=openssh-client [git]=git
  # Automation clients' tests and docs/automation.md's CI example (rsync runs at both ends).
  [rsync]=rsync
  [psql]=postgresql-client [pg_dump]=postgresql-client [curl]=curl [make]=make
  # The browser terminal test drives Debian's chromium with playwright (never `playwright install`).
  [chromium]=chromium
  # make rehearse: pod network and mount namespaces (iproute2, util-linux) and PostgreSQL's own binaries
  # for the chart's bundled database (the rehearsal runs images that are not ours from local binaries).
  [ip]=iproute2 [nsenter]=util-linux [unshare]=util-linux [pg_ctlcluster]=postgresql
  # ... and its NetworkPolicy enforcement: nftables rules in each Pod's network namespace (rehearsal/policy.py).
  [nft]=nftables
  # The local provider's session sandbox: bubblewrap for the namespaces, slirp4netns for its network.
  # ORZ_SANDBOX_DISK_SIZE: each session's own ext4 image (mkfs.ext4; mount and umount come with util-linux).
  [bwrap]=bubblewrap [slirp4netns]=slirp4netns [setpriv]=util-linux [mkfs.ext4]=e2fsprogs
  # bench/real_path.py's floor: a C relay of bytes between ssh and sshd.
  [socat]=socat
)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# promtool (the alert rule tests, tests/k8s/test_observability.py) comes from Debian's prometheus
# package, but only the binary: installing the package would start a Prometheus daemon where there is
# no systemd (its postinst runs the init script). promtool is one static binary, so take it out.
promtool=.cache/bin/promtool
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$promtool" ]; then
  echo "setup: taking promtool from Debian's prometheus package" >&2
  work=$(mktemp -d)
  ( cd "$work" && { apt-get download prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download prometheus >/dev/null; }; } )
  mkdir -p "$(dirname "$promtool")"
  dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -xO ./usr/bin/promtool > "$promtool.tmp"
  chmod 0755 "$promtool.tmp" && mv "$promtool.tmp" "$promtool"
  rm -rf "$work"
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.orz-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Optional extras on top (ORZ_SETUP_EXTRAS=soak: matplotlib for the soak's chart, `make soak`).
extras="${ORZ_SETUP_EXTRAS:-}"
for extra in ${extras//,/ }; do
  if [ ! -f "$stamp-$extra" ] || [ pyproject.toml -nt "$stamp-$extra" ]; then
    .venv/bin/python -m pip install -q -e ".[dev,$extra]"
    touch "$stamp-$extra"
  fi
done
