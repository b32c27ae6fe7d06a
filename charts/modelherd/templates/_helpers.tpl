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
