#!/usr/bin/env bash
# Print a Secret manifest holding every key the orzbob-cloud chart would otherwise generate, for
# `secrets.existingSecret` under GitOps (Argo CD, Flux): seal or encrypt it (kubeseal, SOPS) before it
# goes into git, or load the values into your secrets manager. Needs only openssl.
#
#   hack/gitops-keys-secret.sh orz-keys orz-system > orz-keys.yaml
#
# Private keys are PEM (PKCS#8 ed25519; SEC1 P-256 for the JWT key), their public halves PEM public
# keys (`openssl pkey -pubout`), exactly what the chart would generate, so the two are interchangeable.
set -euo pipefail
name="${1:?usage: $0 SECRET_NAME [NAMESPACE]}"
namespace="${2:-}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
umask 077
alnum() { openssl rand -base64 96 | tr -dc 'A-Za-z0-9' | head -c "$1"; }
for key in ssh-ca-key gateway-host-key gateway-client-key; do
  openssl genpkey -algorithm ed25519 -out "$dir/$key"
done
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/jwt-key"
openssl pkey -in "$dir/ssh-ca-key" -pubout -out "$dir/ssh-ca-public-key"
openssl pkey -in "$dir/jwt-key" -pubout -out "$dir/jwt-public-key"
openssl pkey -in "$dir/gateway-client-key" -pubout -out "$dir/gateway-public-key"
openssl pkey -in "$dir/gateway-host-key" -pubout -out "$dir/gateway-host-public-key"
printf '%s' "$(openssl rand -base64 32)" > "$dir/secrets-key"
printf 'orzs_%s' "$(alnum 43)" > "$dir/service-token"
printf '%s' "$(alnum 32)" > "$dir/postgres-password"
printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n' "$name"
[ -n "$namespace" ] && printf '  namespace: %s\n' "$namespace"
printf 'type: Opaque\ndata:\n'
for file in "$dir"/*; do
  printf '  %s: %s\n' "$(basename "$file")" "$(base64 -w0 < "$file")"
done
