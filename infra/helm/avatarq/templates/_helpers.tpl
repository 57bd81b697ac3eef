{{/* Names and labels shared by every object of the chart. */}}

{{- define "avatarq.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "avatarq.labels" -}}
app.kubernetes.io/name: avatarq
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "worker"). */}}
{{- define "avatarq.selector" -}}
app.kubernetes.io/name: avatarq
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "avatarq.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The settings every container reads: the ConfigMap and the Secret. */}}
{{- define "avatarq.envFrom" -}}
- configMapRef: {name: {{ include "avatarq.name" . }}-config}
- secretRef: {name: {{ .Values.secret.name }}}
{{- end -}}

{{- define "avatarq.podSpec" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
