{{/* Names */}}
{{- define "orz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orz.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Component name: orz.component (dict "root" $ "component" "api") */}}
{{- define "orz.component" -}}
{{- printf "%s-%s" (include "orz.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "orz.secretName" -}}
{{- default (printf "%s-keys" (include "orz.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/* The API Service's in-cluster URL: every internal call goes here, never through an ingress. */}}
{{- define "orz.internalApiUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "orz.component" (dict "root" . "component" "api")) .Release.Namespace (int .Values.api.service.port) }}
{{- end }}

{{- define "orz.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels */}}
{{- define "orz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orz.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "orz.labels" -}}
{{ include "orz.selectorLabels" . }}
app.kubernetes.io/part-of: orzbob-cloud
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Security: every control-plane pod runs as the image's non-root user with a read-only root. */}}
{{- define "orz.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "orz.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The database URL: inline, from a user Secret, or built for the bundled PostgreSQL. */}}
{{- define "orz.databaseEnv" -}}
{{- if .Values.databaseUrl }}
- name: ORZ_DATABASE_URL
  value: {{ .Values.databaseUrl | quote }}
{{- else if .Values.databaseUrlSecret.name }}
- name: ORZ_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.databaseUrlSecret.name }}
      key: {{ .Values.databaseUrlSecret.key }}
{{- else if .Values.postgresql.enabled }}
- name: ORZ_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "orz.secretName" . }}
      key: postgres-password
- name: ORZ_DATABASE_URL
  value: {{ printf "postgresql+asyncpg://%s:$(ORZ_DB_PASSWORD)@%s:5432/%s" .Values.postgresql.username (include "orz.component" (dict "root" . "component" "postgresql")) .Values.postgresql.database | quote }}
{{- else }}
{{- fail "set databaseUrl, databaseUrlSecret.name, or postgresql.enabled=true" }}
{{- end }}
{{- end }}

{{/* Settings every service reads (api/settings.py names). */}}
{{- define "orz.commonEnv" -}}
{{ include "orz.databaseEnv" . }}
- name: ORZ_DATA_DIR
  value: /var/lib/orz
- name: ORZ_PROVIDER
  value: kubernetes
- name: ORZ_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: ORZ_LOG_JSON
  value: "true"
- name: ORZ_API_HOST
  value: "0.0.0.0"
- name: ORZ_API_PORT
  value: {{ .Values.api.port | quote }}
{{- with .Values.config.publicApiUrl }}
- name: ORZ_PUBLIC_API_URL
  value: {{ . | quote }}
{{- end }}
# Gateway -> API (authorize, attach events) and runners -> API (heartbeats, logs) stay in the cluster.
- name: ORZ_INTERNAL_API_URL
  value: {{ include "orz.internalApiUrl" . | quote }}
{{- with .Values.config.publicSshHost }}
- name: ORZ_PUBLIC_SSH_HOST
  value: {{ . | quote }}
{{- end }}
- name: ORZ_PUBLIC_SSH_PORT
  value: {{ .Values.config.publicSshPort | quote }}
{{- with .Values.config.publicWebUrl }}
- name: ORZ_PUBLIC_WEB_URL
  value: {{ . | quote }}
{{- end }}
- name: ORZ_PLAN_IDLE_TIMEOUT_S
  value: {{ .Values.config.planIdleTimeoutSeconds | quote }}
- name: ORZ_QUOTA_FREE
  value: {{ .Values.config.quotas.free | quote }}
- name: ORZ_QUOTA_PRO
  value: {{ .Values.config.quotas.pro | quote }}
- name: ORZ_QUOTA_TEAM
  value: {{ .Values.config.quotas.team | quote }}
- name: ORZ_K8S_NAMESPACE
  value: {{ .Values.sessions.namespace | quote }}
- name: ORZ_K8S_RUNNER_IMAGE
  value: {{ .Values.runner.image | quote }}
- name: ORZ_K8S_STORAGE_CLASS
  value: {{ .Values.sessions.storageClass | quote }}
- name: ORZ_K8S_WORKSPACE_SIZE
  value: {{ .Values.sessions.workspaceSize | quote }}
- name: ORZ_K8S_GATEWAY_SELECTOR
  value: {{ printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=gateway" (include "orz.name" .) .Release.Name | quote }}
- name: ORZ_K8S_GATEWAY_NAMESPACE_SELECTOR
  value: {{ printf "kubernetes.io/metadata.name=%s" .Release.Namespace | quote }}
- name: ORZ_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "orz.secretName" . }}
      key: service-token
- name: ORZ_GATEWAY_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "orz.secretName" . }}
      key: gateway-public-key
- name: ORZ_GATEWAY_HOST_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "orz.secretName" . }}
      key: gateway-host-public-key
      # An existingSecret made before this key existed: clients then trust the host key on first use.
      optional: true
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Sign-in settings (values `signin`, docs/sign-in.md) for one component:
     orz.signinEnv (dict "root" $ "part" "api"|"gateway"). The API gets all of them, its client secrets only as
     secretKeyRefs to Secrets the operator made; the gateway only what its pages' "Sign in with ..." links need
     (api/settings.py signin_providers: issuer, client ids, name), never a secret; other components nothing. */}}
{{- define "orz.signinEnv" -}}
{{- $s := .root.Values.signin }}
{{- $api := eq .part "api" }}
{{- range $name, $_ := $.root.Values.config.extraEnv }}
{{- if has $name (list "ORZ_OIDC_CLIENT_SECRET" "ORZ_GITHUB_CLIENT_SECRET") }}
{{- fail (printf "config.extraEnv.%s would put a client secret into every component's Pod spec: put it in a Secret and name it in signin.%s.clientSecret (name, key)" $name (ternary "oidc" "github" (hasPrefix "ORZ_OIDC" $name))) }}
{{- end }}
{{- end }}
{{- $plain := dict }}
{{- with $s.oidc }}
{{- if or .clientSecret.name .scopes }}{{ if not .issuer }}{{ fail "signin.oidc: set issuer and clientId (the client secret and scopes are for that issuer)" }}{{ end }}{{ end }}
{{- if and .issuer (not .clientId) }}{{ fail "signin.oidc.issuer is set: set signin.oidc.clientId too" }}{{ end }}
{{- if .issuer }}
{{- $_ := set $plain "ORZ_OIDC_ISSUER" .issuer }}
{{- $_ := set $plain "ORZ_OIDC_CLIENT_ID" .clientId }}
{{- with .name }}{{ $_ := set $plain "ORZ_OIDC_NAME" . }}{{ end }}
{{- if $api }}{{ with .scopes }}{{ $_ := set $plain "ORZ_OIDC_SCOPES" . }}{{ end }}{{ end }}
{{- end }}
{{- end }}
{{- with $s.github }}
{{- if and (not .clientId) (or .clientSecret.name .baseUrl .apiUrl) }}{{ fail "signin.github: set clientId (the client secret and URLs are for that OAuth app)" }}{{ end }}
{{- /* GitHub's web flow (the browser's sign-in) needs the client secret: without one the gateway offers no link. */}}
{{- if and .clientId (or $api .clientSecret.name) }}{{ $_ := set $plain "ORZ_GITHUB_CLIENT_ID" .clientId }}{{ end }}
{{- if and $api .clientId }}
{{- with .baseUrl }}{{ $_ := set $plain "ORZ_GITHUB_BASE_URL" . }}{{ end }}
{{- with .apiUrl }}{{ $_ := set $plain "ORZ_GITHUB_API_URL" . }}{{ end }}
{{- end }}
{{- end }}
{{- if $api }}
{{- with $s.newUsers }}{{ $_ := set $plain "ORZ_SIGNIN_NEW_USERS" . }}{{ end }}
{{- with $s.org }}{{ $_ := set $plain "ORZ_SIGNIN_ORG" . }}{{ end }}
{{- with $s.allowedDomains }}{{ $_ := set $plain "ORZ_SIGNIN_ALLOWED_DOMAINS" (join "," .) }}{{ end }}
{{- with $s.githubOrgs }}{{ $_ := set $plain "ORZ_SIGNIN_GITHUB_ORGS" (join "," .) }}{{ end }}
{{- with $s.githubTeams }}{{ $_ := set $plain "ORZ_SIGNIN_GITHUB_TEAMS" (join "," .) }}{{ end }}
{{- end }}
{{- range $name, $value := $plain }}
{{- if hasKey $.root.Values.config.extraEnv $name }}
{{- fail (printf "%s is set both by config.extraEnv and by signin: keep it in signin only" $name) }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if $api }}
{{- range $provider := list "oidc" "github" }}
{{- $ref := (index $s $provider).clientSecret }}
{{- if $ref.name }}
- name: {{ printf "ORZ_%s_CLIENT_SECRET" (upper $provider) }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | quote }}
      key: {{ $ref.key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Writable scratch space for a read-only root filesystem. */}}
{{- define "orz.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
- name: data
  emptyDir:
    sizeLimit: 256Mi
{{- end }}

{{- define "orz.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/orz
{{- end }}

{{- define "orz.keysVolume" -}}
- name: keys
  secret:
    secretName: {{ include "orz.secretName" .root }}
    defaultMode: 0440
    items:
{{- range .keys }}
      - key: {{ . }}
        path: {{ . }}
{{- end }}
{{- end }}

{{/* An Ingress's annotations: its own, then cert-manager's issuer when set (ingress.certManager). */}}
{{- define "orz.ingressAnnotations" -}}
{{- $cm := .root.Values.ingress.certManager }}
{{- $a := merge (dict) (.annotations | default dict) }}
{{- if $cm.clusterIssuer }}{{ $_ := set $a "cert-manager.io/cluster-issuer" $cm.clusterIssuer }}{{ end }}
{{- if $cm.issuer }}{{ $_ := set $a "cert-manager.io/issuer" $cm.issuer }}{{ end }}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* An Ingress's tls: as given, or with cert-manager one entry for its hosts in a Secret it fills. */}}
{{- define "orz.ingressTls" -}}
{{- $cm := .root.Values.ingress.certManager }}
{{- $tls := .tls }}
{{- if and (not $tls) (or $cm.clusterIssuer $cm.issuer) }}
{{- if not .hosts }}{{ fail (printf "%s: cert-manager needs host names to ask a certificate for (set %s)" .what .hostsKey) }}{{ end }}
{{- $tls = list (dict "secretName" (printf "%s-tls" .name) "hosts" .hosts) }}
{{- end }}
{{- with $tls }}
tls:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
