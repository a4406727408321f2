{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: <release> when it already holds the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "kubetune.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* Cluster-wide unless watchNamespaces lists namespaces. */}}
{{- define "kubetune.clusterWide" -}}
{{- if eq (len .Values.watchNamespaces) 0 }}true{{ end }}
{{- end }}

{{/* The Service name trainer pods reach the progress endpoint at. */}}
{{- define "kubetune.progressServiceName" -}}
{{- printf "%s-progress" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator uses (in a Role or a ClusterRole): the
calls in operator/kubetune_operator/controller.py plus kopf's watches. kopf runs standalone
(no peering objects) with its own event posting off, and only has event handlers (no
finalizers, no annotations on FineTuneJobs). `get` comes with every `list` (it shows nothing
more). No Secrets and no ConfigMaps at all: the trainer reads its job from its own pod's
annotation, proves itself with a projected token, and the kubelet resolves the credentials.
tests/chart/test_helm.py holds the same table (NAMESPACED_VERBS).
*/}}
{{- define "kubetune.namespacedRules" -}}
# Watched through kopf; the operator never changes a FineTuneJob's spec or metadata.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# One Event per phase change of a FineTuneJob.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# One batch Job per FineTuneJob runs the trainer: created, suspended/resumed (patch),
# deleted with its FineTuneJob.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# A multi-node gang's headless Service (stable DNS names for its pods): created, owned by
# the FineTuneJob and garbage-collected with it.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# ... and its NetworkPolicy (only the gang's own pods may connect to it), the same way.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create"]
# Trainer pods: watched, read only (status, termination message, which pod a progress
# token is bound to).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
Cluster-scoped in every mode: the TokenReview API, to check the trainers' progress tokens (a
TokenReview is a question to the API server, stored nowhere).
*/}}
{{- define "kubetune.tokenReviewRules" -}}
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
{{- end }}

{{/*
The operator's settings as environment variables: KUBETUNE_OPERATOR_<FIELD> for each field of
kubetune_operator.settings.OperatorSettings (tests/test_helm.py keeps the names in step).
*/}}
{{- define "kubetune.operatorEnv" -}}
{{- $v := .Values -}}
- name: KUBETUNE_OPERATOR_NAMESPACES
  value: {{ join "," $v.watchNamespaces | quote }}
- name: KUBETUNE_OPERATOR_TRAINER_IMAGE
  value: {{ include "kubetune.image" (dict "root" . "image" $v.trainer.image) | quote }}
- name: KUBETUNE_OPERATOR_TRAINER_ALLOWED_IMAGES
  value: {{ join "," $v.trainer.allowedImages | quote }}
- name: KUBETUNE_OPERATOR_DEFAULT_CPU
  value: {{ $v.trainer.resources.cpu | toString | quote }}
- name: KUBETUNE_OPERATOR_DEFAULT_MEMORY
  value: {{ $v.trainer.resources.memory | toString | quote }}
- name: KUBETUNE_OPERATOR_DEFAULT_WORK_DIR_SIZE
  value: {{ $v.trainer.workDirSize | default "" | toString | quote }}
- name: KUBETUNE_OPERATOR_RUN_AS_USER
  value: {{ $v.trainer.runAsUser | toString | quote }}
- name: KUBETUNE_OPERATOR_GPU_MEMORY_GIB
  value: {{ $v.trainer.gpuMemoryGiB | toString | quote }}
- name: KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR
  value: {{ $v.trainer.nodeSelector | default dict | toJson | quote }}
- name: KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS
  value: {{ $v.trainer.tolerations | default list | toJson | quote }}
- name: KUBETUNE_OPERATOR_NODE_LOST_TOLERATION_S
  value: {{ if kindIs "invalid" $v.trainer.nodeLostTolerationSeconds }}""{{ else }}{{ $v.trainer.nodeLostTolerationSeconds | int | toString | quote }}{{ end }}
- name: KUBETUNE_OPERATOR_TRAINER_READ_ONLY_ROOT
  value: {{ $v.trainer.readOnlyRootFilesystem | toString | quote }}
- name: KUBETUNE_OPERATOR_TRAINER_GRACE_SECONDS
  value: {{ $v.trainer.graceSeconds | int | toString | quote }}
- name: KUBETUNE_OPERATOR_CHECKPOINT_MIB_PER_S
  value: {{ $v.trainer.checkpointMiBPerSecond | toString | quote }}
{{- with $v.s3.endpoint }}
- name: KUBETUNE_OPERATOR_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with $v.s3.region }}
- name: KUBETUNE_OPERATOR_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $v.s3.credentialsSecret }}
- name: KUBETUNE_OPERATOR_DEFAULT_CREDENTIALS_SECRET
  value: {{ . | quote }}
{{- end }}
- name: KUBETUNE_OPERATOR_ALLOWED_SCHEMES
  value: {{ join "," $v.uriPolicy.allowedSchemes | quote }}
- name: KUBETUNE_OPERATOR_ALLOWED_S3_PREFIXES
  value: {{ join "," $v.uriPolicy.allowedS3Prefixes | quote }}
- name: KUBETUNE_OPERATOR_LISTEN_PORT
  value: {{ $v.progress.port | toString | quote }}
# Trainer pods reach the progress endpoint through the Service, not the pod address.
- name: KUBETUNE_OPERATOR_PROGRESS_BASE_URL
  value: {{ printf "%s://%s.%s.svc:%v" (ternary "https" "http" (not (empty $v.progress.tls.secretName))) (include "kubetune.progressServiceName" .) .Release.Namespace $v.progress.port | quote }}
{{- with $v.progress.tls.secretName }}
- name: KUBETUNE_OPERATOR_TLS_DIR
  value: /etc/kubetune/tls
{{- end }}
- name: KUBETUNE_OPERATOR_PATCH_INTERVAL_S
  value: {{ $v.progress.patchIntervalSeconds | toString | quote }}
- name: KUBETUNE_OPERATOR_PROGRESS_AUDIENCE
  value: {{ $v.progress.tokenAudience | quote }}
- name: KUBETUNE_OPERATOR_PROGRESS_TOKEN_TTL_S
  value: {{ $v.progress.tokenTTLSeconds | toString | quote }}
- name: KUBETUNE_OPERATOR_GPU_HOUR_PRICE
  value: {{ $v.usage.gpuHourPrice | toString | quote }}
- name: KUBETUNE_OPERATOR_CURRENCY
  value: {{ $v.usage.currency | quote }}
- name: KUBETUNE_OPERATOR_WORKERS
  value: {{ $v.workers | toString | quote }}
- name: KUBETUNE_OPERATOR_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: KUBETUNE_OPERATOR_LEADER_ELECTION
  value: {{ $v.leaderElection.enabled | toString | quote }}
- name: KUBETUNE_OPERATOR_LEASE_NAME
  value: {{ include "kubetune.fullname" . | quote }}
- name: KUBETUNE_OPERATOR_LEASE_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: KUBETUNE_OPERATOR_LEASE_DURATION_S
  value: {{ $v.leaderElection.leaseDurationSeconds | toString | quote }}
- name: KUBETUNE_OPERATOR_RENEW_DEADLINE_S
  value: {{ $v.leaderElection.renewDeadlineSeconds | toString | quote }}
- name: KUBETUNE_OPERATOR_RETRY_PERIOD_S
  value: {{ $v.leaderElection.retryPeriodSeconds | toString | quote }}
- name: KUBETUNE_OPERATOR_WATCH_DEAD_AFTER_S
  value: {{ $v.watchDeadAfterSeconds | toString | quote }}
# Followers forward progress pushes to the leader's pod address (the operator's peer URL).
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/*
Refuse a cluster older than compatibility.minKubeVersion. Only against a real cluster: the
lookup answers only when helm talks to one (install, upgrade, --dry-run=server), so `helm
template` renders offline whatever its default version is.
*/}}
{{- define "kubetune.checkKubeVersion" -}}
{{- if lookup "v1" "Namespace" "" "kube-system" }}
{{- $version := .Capabilities.KubeVersion.Version }}
{{- $minimum := .Values.compatibility.minKubeVersion }}
{{- if not (semverCompare (printf ">=%s" $minimum) $version) }}
{{- fail (printf "kubetune needs Kubernetes %s or newer; this cluster runs %s" $minimum $version) }}
{{- end }}
{{- end }}
{{- end }}
