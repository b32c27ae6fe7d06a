{{/* The chart name, overridable. */}}
{{- define "modelherd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: release-chart (just the release when it already contains the chart name), 63 characters. */}}
{{- define "modelherd.fullname" -}}
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

{{/* chart-version, as the helm.sh/chart label. */}}
{{- define "modelherd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (no version). Call with (dict "ctx" . "component" "agent"). */}}
{{- define "modelherd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelherd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object. Call with (dict "ctx" . "component" "agent"). */}}
{{- define "modelherd.labels" -}}
helm.sh/chart: {{ include "modelherd.chart" .ctx }}
{{ include "modelherd.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: modelherd
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The agent's ServiceAccount. */}}
{{- define "modelherd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelherd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller's objects and ServiceAccount. The full name is shortened first, so that the suffix survives
the 63 characters: truncating the whole would give a long release's controller the agent's names. */}}
{{- define "modelherd.controllerName" -}}
{{- printf "%s-controller" (include "modelherd.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/* The metrics Service (a DNS label: 63 characters at most), the suffix kept like the controller's. */}}
{{- define "modelherd.metricsServiceName" -}}
{{- printf "%s-metrics" (include "modelherd.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* repository:tag, the tag defaulting to the appVersion. */}}
{{- define "modelherd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The probes' host: the bind address when the server listens on one address only (e.g. 127.0.0.1). */}}
{{- define "modelherd.probeHost" -}}
{{- if and .Values.agent.bindAddress (ne .Values.agent.bindAddress "0.0.0.0") (ne .Values.agent.bindAddress "::") }}
host: {{ .Values.agent.bindAddress }}
{{- end }}
{{- end }}

{{/* Where the agents' status ConfigMaps, Leases and ClusterBaseModel token Secrets live (and where the controller
reads them and holds its Lease): statusNamespace, else the release namespace. */}}
{{- define "modelherd.statusNamespace" -}}
{{- default .Release.Namespace .Values.statusNamespace }}
{{- end }}

{{/* storage.readOnlyNodes' DaemonSet, the suffix kept like the controller's. */}}
{{- define "modelherd.readOnlyAgentName" -}}
{{- printf "%s-read-only" (include "modelherd.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* The label every agent pod carries, of both DaemonSets (their selectors differ by component): the PodMonitor
and the metrics Service select the agents with it. */}}
{{- define "modelherd.agentPodLabel" -}}
modelherd.io/agent: "true"
{{- end }}

{{/* What the PodMonitor and the metrics Service select: every agent pod (not the controller's). */}}
{{- define "modelherd.agentPodSelectorLabels" -}}
app.kubernetes.io/name: {{ include "modelherd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "modelherd.agentPodLabel" . }}
{{- end }}


{{/*
The agent's affinity as YAML (empty for none): `affinity` as is, else the gpuNodesOnly preset. With
storage.readOnlyNodes.enabled, every required nodeSelectorTerm (one is created if there is none) gets
{key: <nodeLabel>, operator: NotIn, values: [<value>]} in the main DaemonSet and `In` in the read-only one: the
terms are ORed, so only an expression in each of them keeps the main agents off the read-only nodes, and the two
DaemonSets split exactly the nodes that one would run on. Call with (dict "ctx" . "readOnly" bool).
*/}}
{{- define "modelherd.agentAffinity" -}}
{{- $v := .ctx.Values }}
{{- $affinity := dict }}
{{- if $v.affinity }}
{{- $affinity = deepCopy $v.affinity }}
{{- else if $v.gpuNodesOnly }}
{{- $gpu := list
      (dict "matchExpressions" (list (dict "key" "nvidia.com/gpu.present" "operator" "In" "values" (list "true"))))
      (dict "matchExpressions" (list (dict "key" "feature.node.kubernetes.io/pci-10de.present" "operator" "In" "values" (list "true")))) }}
{{- $affinity = dict "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" $gpu)) }}
{{- end }}
{{- $ro := $v.storage.readOnlyNodes }}
{{- if $ro.enabled }}
{{- $node := $affinity.nodeAffinity | default dict }}
{{- $required := $node.requiredDuringSchedulingIgnoredDuringExecution | default dict }}
{{- $terms := $required.nodeSelectorTerms | default (list dict) }}
{{- $expression := dict "key" $ro.nodeLabel "operator" (ternary "In" "NotIn" .readOnly) "values" (list $ro.value) }}
{{- $withLabel := list }}
{{- range $terms }}
{{- $term := deepCopy . }}
{{- $_ := set $term "matchExpressions" (append ($term.matchExpressions | default list) $expression) }}
{{- $withLabel = append $withLabel $term }}
{{- end }}
{{- $_ := set $required "nodeSelectorTerms" $withLabel }}
{{- $_ := set $node "requiredDuringSchedulingIgnoredDuringExecution" $required }}
{{- $_ := set $affinity "nodeAffinity" $node }}
{{- end }}
{{- with $affinity }}
{{- toYaml . }}
{{- end }}
{{- end }}
