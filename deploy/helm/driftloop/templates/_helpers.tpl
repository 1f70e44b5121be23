{{/* Names and labels shared by every object of the chart. */}}

{{- define "driftloop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "driftloop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: driftloop
{{- end -}}

{{/* Selector of one component: (dict "root" $ "component" "gateway") */}}
{{- define "driftloop.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "driftloop.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "driftloop.fullname" .)) -}}
{{- end -}}

{{- define "driftloop.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Every setting reaches the containers from the ConfigMap and the Secret; pods roll when
either changes. */}}
{{- define "driftloop.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "driftloop.fullname" . }}-settings
  - secretRef:
      name: {{ include "driftloop.secretName" . }}
{{- end -}}

{{- define "driftloop.checksums" -}}
checksum/settings: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secrets: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* Pull secrets and the pod security context every pod of the chart shares. */}}
{{- define "driftloop.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}
