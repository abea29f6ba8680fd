{{- define "keystone.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keystone.selectorLabels" -}}
app.kubernetes.io/name: keystone-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keystone.labels" -}}
{{ include "keystone.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: keystone
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "keystone.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keystone.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "keystone.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "keystone.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) -}}
{{- end -}}

{{/* The web console: its own name (also its ServiceAccount's), and labels that
never match the operator's selector (the operator's pods are the ones its
NetworkPolicies admit to the runtime pods). */}}
{{- define "keystone.console.fullname" -}}
{{- printf "%s-console" (include "keystone.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keystone.console.selectorLabels" -}}
app.kubernetes.io/name: keystone-console
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keystone.console.labels" -}}
{{ include "keystone.console.selectorLabels" . }}
app.kubernetes.io/component: console
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: keystone
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "keystone.console.image" -}}
{{- printf "%s:%s" .Values.console.image.repository (default .Chart.AppVersion .Values.console.image.tag) -}}
{{- end -}}

{{/* The Secrets holding Kafka credentials, so the Role can name them and nothing else. */}}
{{- define "keystone.kafkaSecrets" -}}
{{- $names := list -}}
{{- range $name, $cluster := .Values.kafka.clusters -}}
{{- with $cluster.tls -}}
{{- range $k := list "ca" "certificate" "key" -}}
{{- with (get $.Values.kafka.clusters $name).tls -}}
{{- with (get . $k) -}}{{- $names = append $names .secret -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $cluster.sasl -}}
{{- $names = append $names .username.secret -}}
{{- $names = append $names .password.secret -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* The credential Secrets runtime pods read (in their own namespace): those of
clusters without per-pipeline principals. */}}
{{- define "keystone.runtimeKafkaSecrets" -}}
{{- $names := list -}}
{{- range $name, $cluster := .Values.kafka.clusters -}}
{{- if not (and $cluster.authorization (eq $cluster.authorization.mode "Acls")) -}}
{{- with $cluster.tls -}}
{{- range $k := list "ca" "certificate" "key" -}}
{{- with (get $.Values.kafka.clusters $name).tls -}}
{{- with (get . $k) -}}{{- $names = append $names .secret -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $cluster.sasl -}}
{{- $names = append $names .username.secret -}}
{{- $names = append $names .password.secret -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* The operator's configuration file. */}}
{{- define "keystone.config" -}}
runtimeImage: {{ include "keystone.runtimeImage" . | quote }}
runtimeImagePullPolicy: {{ .Values.runtime.image.pullPolicy | quote }}
{{- with .Values.runtime.bindAddress }}
runtimeBindAddress: {{ . | quote }}
{{- end }}
{{- with .Values.runtime.resources }}
runtimeResources:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.kafka.defaultCluster }}
defaultCluster: {{ . | quote }}
{{- end }}
kafkaClusters:
{{ toYaml .Values.kafka.clusters | indent 2 }}
watchNamespaces: {{ toJson .Values.watchNamespaces }}
reconcileConcurrency: {{ .Values.reconcileConcurrency }}
{{- with .Values.policy }}
policy:
  {{- if .allowedRuntimeImages }}
  allowedRuntimeImages: {{ toJson .allowedRuntimeImages }}
  {{- else }}
  allowedRuntimeImages: [{{ printf "%s:*" $.Values.runtime.image.repository | quote }}, {{ printf "%s@*" $.Values.runtime.image.repository | quote }}]
  {{- end }}
  {{- if .maxPartitions }}
  maxPartitions: {{ .maxPartitions }}
  {{- end }}
  {{- if .maxReplicationFactor }}
  maxReplicationFactor: {{ .maxReplicationFactor }}
  {{- end }}
  allowedReplicationFactors: {{ toJson (.allowedReplicationFactors | default list) }}
  {{- if kindIs "slice" .allowedTopicConfigs }}
  allowedTopicConfigs: {{ toJson .allowedTopicConfigs }}
  {{- end }}
  maxTopicConfigValues: {{ toJson (.maxTopicConfigValues | default dict) }}
{{- end }}
networkPolicy:
  enabled: {{ .Values.networkPolicy.enabled }}
  operatorPodLabels:
    {{- include "keystone.selectorLabels" . | nindent 4 }}
  {{- $metricsFrom := .Values.networkPolicy.metricsFrom | default list }}
  {{- if .Values.console.enabled }}
  {{- /* The console reads the runtime pods' metrics for its live numbers. */}}
  {{- $console := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "keystone.console.selectorLabels" . | fromYaml)) }}
  {{- $metricsFrom = append $metricsFrom $console }}
  {{- end }}
  metricsFrom: {{ toJson $metricsFrom }}
{{- with .Values.ingest }}
{{- if or .resources .ingress.enabled }}
ingest:
  {{- with .resources }}
  resources:
{{ toYaml . | indent 4 }}
  {{- end }}
  {{- if .ingress.enabled }}
  ingress:
    enabled: true
    {{- with .ingress.className }}
    className: {{ . | quote }}
    {{- end }}
    host: {{ .ingress.host | quote }}
    annotations: {{ toJson (.ingress.annotations | default dict) }}
    {{- with .ingress.tlsSecret }}
    tlsSecret: {{ . | quote }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* What the operator needs where Pipelines live. */}}
{{- define "keystone.pipelineRules" }}
# The custom resources it reconciles.
- apiGroups: [keystone.dev]
  resources: [pipelines, processors]
  verbs: [get, list, watch, patch]
- apiGroups: [keystone.dev]
  resources: [pipelines/status, processors/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion need this on the owner.
- apiGroups: [keystone.dev]
  resources: [pipelines/finalizers]
  verbs: [update]
# What it creates per pipeline: plan ConfigMaps, Deployments, Services, PodDisruptionBudgets.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Checkpoints address each runtime instance (its pod IP, readiness and plan hash).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
{{- $acls := false }}
{{- range $name, $cluster := .Values.kafka.clusters }}
{{- if and $cluster.authorization (eq $cluster.authorization.mode "Acls") }}{{- $acls = true }}{{- end }}
{{- end }}
{{- if $acls }}
# Per-pipeline Kafka principals: the Secret holding each Pipeline's credential
# (named <pipeline>-kafka-user, owned by the Pipeline) is created, read and
# deleted by the operator. Secret names cannot be known in advance, so this is
# every Secret of the namespaces where Pipelines live: list them in
# watchNamespaces to bound it.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, delete]
{{- end }}
{{- $secrets := include "keystone.runtimeKafkaSecrets" . | fromJsonArray }}
{{- if $secrets }}
# The Kafka credential Secrets the runtime pods read (and no others): a digest
# of them on the pod template rolls the pods when a credential is rotated, and
# the operator watches them by name to do so at once.
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toJson $secrets }}
  verbs: [get, list, watch]
{{- end }}
{{- $registrySecrets := .Values.schemaRegistrySecrets | default list }}
{{- range $name, $cluster := .Values.kafka.clusters }}
{{- with $cluster.schemaRegistry }}
{{- with .credentialsSecret }}{{- $registrySecrets = append $registrySecrets . }}{{- end }}
{{- with .caSecret }}{{- $registrySecrets = append $registrySecrets . }}{{- end }}
{{- end }}
{{- end }}
{{- if $registrySecrets }}
# The schema registry's credential and CA Secrets (a Pipeline's
# spec.schemaRegistry, or a cluster's schemaRegistry): the operator asks the
# registry for the source's schema and the sinks' compatibility before deploy.
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ $registrySecrets | uniq | sortAlpha | toJson }}
  verbs: [get]
{{- end }}
# Each pipeline's control token Secret, created once and never read back.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
{{- if .Values.networkPolicy.enabled }}
# Each pipeline's NetworkPolicy: only the operator and the metrics scraper reach its pods.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
{{- if .Values.ingest.ingress.enabled }}
# The Ingress of each HTTP ingest endpoint.
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [get, create, patch, delete]
{{- end }}
{{- end }}
