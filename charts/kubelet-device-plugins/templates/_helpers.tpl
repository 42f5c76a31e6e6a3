{{/* The name of every object: fixed, as the kustomize manifests have it, unless overridden. */}}
{{- define "kdp.fullname" -}}
{{- .Values.fullnameOverride | default "kubelet-device-plugins" -}}
{{- end -}}

{{/* The kubelet's root directory: the operator's own, or the preset's. */}}
{{- define "kdp.kubeletRoot" -}}
{{- if .Values.kubelet.root -}}
{{- .Values.kubelet.root | trimSuffix "/" -}}
{{- else -}}
{{- $roots := dict "kubeadm" "/var/lib/kubelet" "k3s" "/var/lib/kubelet" "k0s" "/var/lib/k0s/kubelet" "microk8s" "/var/snap/microk8s/common/var/lib/kubelet" -}}
{{- get $roots .Values.kubelet.preset -}}
{{- end -}}
{{- end -}}

{{/* The extended resources' domain: the configuration file's, or ours. */}}
{{- define "kdp.domain" -}}
{{- .Values.config.domain | default "devices.anza-labs.dev" -}}
{{- end -}}

{{/* What selects our pods: the same label the kustomize manifests select on. */}}
{{- define "kdp.selectorLabels" -}}
app.kubernetes.io/name: kubelet-device-plugins
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Every object's labels: the kustomize manifests' two, and Helm's own. */}}
{{- define "kdp.labels" -}}
app.kubernetes.io/name: kubelet-device-plugins
app.kubernetes.io/part-of: kubelet-device-plugins
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The image reference: by digest when one is given. */}}
{{- define "kdp.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Whether the cluster's DaemonSets can surge (1.22 and later). */}}
{{- define "kdp.canSurge" -}}
{{- if semverCompare ">=1.22.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}
