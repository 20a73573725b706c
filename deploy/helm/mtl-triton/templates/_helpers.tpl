{{/* Names: the chart name, and the release-qualified name every object carries (63 characters at most). */}}
{{- define "mtl-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mtl-triton.fullname" -}}
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

{{/* The fullname plus a suffix, the fullname cut so that the whole stays within 63 characters.
Call with (list . "suffix"). */}}
{{- define "mtl-triton.suffixed" -}}
{{- $ctx := index . 0 }}{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "mtl-triton.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "mtl-triton.headlessName" -}}
{{- include "mtl-triton.suffixed" (list . "headless") }}
{{- end }}

{{- define "mtl-triton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mtl-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mtl-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mtl-triton.labels" -}}
helm.sh/chart: {{ include "mtl-triton.chart" . }}
{{ include "mtl-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mtl-triton
{{- end }}

{{/* The label that lets a pod through the NetworkPolicy to gRPC and HTTP. */}}
{{- define "mtl-triton.clientLabel" -}}
{{- include "mtl-triton.suffixed" (list . "client") }}
{{- end }}

{{- define "mtl-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mtl-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mtl-triton.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{- define "mtl-triton.adminKeySecret" -}}
{{- default (include "mtl-triton.suffixed" (list . "admin-key")) .Values.adminKey.existingSecret }}
{{- end }}

{{- define "mtl-triton.pvcName" -}}
{{- default (include "mtl-triton.suffixed" (list . "models")) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{/* What Triton gets as --model-repository. */}}
{{- define "mtl-triton.modelRepository" -}}
{{- $repo := .Values.modelRepository }}
{{- if eq $repo.source "s3" }}
{{- $repo.s3.uri }}
{{- else if eq $repo.source "gcs" }}
{{- $repo.gcs.uri }}
{{- else }}
{{- "/models" }}
{{- end }}
{{- end }}

{{/*
The queue-to-compute ratio of this release's model, in PromQL. `selector` is the label matcher of the
series to use (the adapter's <<.LabelMatchers>>, or this release's namespace and Service for KEDA);
`by` groups by (the adapter's <<.GroupBy>>) or is empty. clamp_min keeps an idle server at 0, not NaN.
*/}}
{{- define "mtl-triton.queueComputeRatio" -}}
{{- $by := ternary "" (printf " by (%s)" .by) (empty .by) -}}
sum{{ $by }}(rate(nv_inference_queue_duration_us{{ printf "{%s}" .selector }}[{{ .window }}])) / clamp_min(sum{{ $by }}(rate(nv_inference_compute_infer_duration_us{{ printf "{%s}" .selector }}[{{ .window }}])), 1)
{{- end }}

{{/* Refuse values that render but would not work. */}}
{{- define "mtl-triton.validate" -}}
{{- $v := .Values }}
{{- $needed := add $v.lifecycle.preStopSleepSeconds $v.triton.exitTimeoutSeconds 5 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least lifecycle.preStopSleepSeconds + triton.exitTimeoutSeconds + 5 = %d, or the kubelet kills Triton while requests are in flight" (int $v.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
{{- $given := 0 }}
{{- range $key := list "minAvailable" "maxUnavailable" }}
{{- /* A null in values removes the key, so "given" is "present". */}}
{{- if hasKey $v.podDisruptionBudget $key }}{{ $given = add1 $given }}{{ end }}
{{- end }}
{{- if ne (int $given) 1 }}
{{- fail "podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (null the other)" }}
{{- end }}
{{- end }}
{{- end }}
