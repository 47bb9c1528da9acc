{{/* Names: 63 characters at most; KubeRay appends suffixes to RayJob/RayService names, hence 40. */}}
{{- define "cxrfm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "cxrfm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "cxrfm.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "cxrfm.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cxrfm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cxrfm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cxrfm.labels" -}}
{{ include "cxrfm.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cxrfm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cxrfm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pods that never call the API server run under this account, with no token mounted. */}}
{{- define "cxrfm.noApiServiceAccountName" -}}
{{- printf "%s-no-api" (include "cxrfm.fullname" .) -}}
{{- end -}}

{{- define "cxrfm.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "cxrfm.sharedClaim" -}}
{{- default (printf "%s-shared" (include "cxrfm.fullname" .)) .Values.sharedStorage.existingClaim -}}
{{- end -}}

{{- define "cxrfm.mlflowUri" -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "cxrfm.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "cxrfm.postgresHost" -}}
{{- if .Values.mlflow.backendStore.internal -}}
{{- printf "%s-postgresql" (include "cxrfm.fullname" .) -}}
{{- else -}}
{{- required "mlflow.backendStore.host is required when mlflow.backendStore.internal is false" .Values.mlflow.backendStore.host -}}
{{- end -}}
{{- end -}}

{{- define "cxrfm.postgresSecret" -}}
{{- default (printf "%s-postgresql" (include "cxrfm.fullname" .)) .Values.mlflow.backendStore.existingSecret -}}
{{- end -}}

{{- define "cxrfm.s3Secret" -}}
{{- default (printf "%s-s3" (include "cxrfm.fullname" .)) .Values.mlflow.artifactStore.existingSecret -}}
{{- end -}}

{{- define "cxrfm.s3Endpoint" -}}
{{- if .Values.mlflow.artifactStore.internal -}}
{{- printf "http://%s-objectstore:9000" (include "cxrfm.fullname" .) -}}
{{- else -}}
{{- .Values.mlflow.artifactStore.endpointUrl -}}
{{- end -}}
{{- end -}}

{{- define "cxrfm.tenantsSecret" -}}
{{- default (printf "%s-tenants" (include "cxrfm.fullname" .)) .Values.serving.existingTenantsSecret -}}
{{- end -}}

{{/* serving.tenants must be a store written by `cxrfm tenants add`: keys as salt + hash, never a key. */}}
{{- define "cxrfm.checkTenants" -}}
{{- $how := "give the file that `cxrfm tenants add NAME --store tenants.yaml` writes (--set-file serving.tenants=tenants.yaml)" -}}
{{- if regexMatch "cxrfm_[0-9a-f]{12}_" . -}}
{{- fail (printf "serving.tenants holds a plaintext API key; the store keeps salted hashes only: %s" $how) -}}
{{- end -}}
{{- $data := fromYaml . -}}
{{- if or (hasKey $data "Error") (not (hasKey $data "tenants")) (not (kindIs "map" (get $data "tenants" | default dict))) -}}
{{- fail (printf "serving.tenants is not a tenants YAML (a map with tenants: and keys:): %s" $how) -}}
{{- end -}}
{{- range $i, $k := (get $data "keys" | default list) -}}
{{- if not (and (kindIs "map" $k) (hasKey $k "key_id") (hasKey $k "tenant") (hasKey $k "salt") (hasKey $k "hash")) -}}
{{- fail (printf "serving.tenants: keys[%d] needs key_id, tenant, salt and hash: %s" $i $how) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A value kept from the live Secret on upgrade, else the given one, else generated. */}}
{{- define "cxrfm.secretValue" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .secret -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else if .value -}}
{{- .value -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}

{{/* Writable places under a read-only root: Ray's session dir and compiler/kernel caches. */}}
{{- define "cxrfm.rayEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: TORCH_EXTENSIONS_DIR
  value: /tmp/torch_extensions
- name: MLFLOW_TRACKING_URI
  value: {{ include "cxrfm.mlflowUri" . | quote }}
{{- end -}}

{{- define "cxrfm.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "cxrfm.sharedClaim" .ctx }}
{{- end -}}

{{- define "cxrfm.rayMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: shared
  mountPath: /mnt/cxrfm
{{- end -}}

{{/* Worker resources with the GPU count added to requests and limits. */}}
{{- define "cxrfm.workerResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $res.requests "nvidia.com/gpu" (toString .gpus) -}}
{{- $_ := set $res.limits "nvidia.com/gpu" (toString .gpus) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* GPU nodes are usually tainted; the product label (GPU feature discovery) pins the kind. */}}
{{- define "cxrfm.gpuScheduling" -}}
tolerations:
  - key: nvidia.com/gpu
    operator: Exists
    effect: NoSchedule
{{- if .product }}
nodeSelector:
  nvidia.com/gpu.product: {{ .product | quote }}
{{- end }}
{{- end -}}

{{- define "cxrfm.mlflowS3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "cxrfm.s3Secret" . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "cxrfm.s3Secret" . }}, key: AWS_SECRET_ACCESS_KEY}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.mlflow.artifactStore.region | quote }}
{{- with include "cxrfm.s3Endpoint" . }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end -}}
