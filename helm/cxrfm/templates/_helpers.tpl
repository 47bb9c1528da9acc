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

{{/* Worker resources with the GPU count (and RDMA devices) added to requests and limits alike. */}}
{{- define "cxrfm.workerResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $res.requests "nvidia.com/gpu" (toString .gpus) -}}
{{- $_ := set $res.limits "nvidia.com/gpu" (toString .gpus) -}}
{{- end -}}
{{- $rdma := .rdma | default dict -}}
{{- if $rdma.resourceName -}}
{{- $_ := set $res.requests $rdma.resourceName (toString ($rdma.perWorker | default 1)) -}}
{{- $_ := set $res.limits $rdma.resourceName (toString ($rdma.perWorker | default 1)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* training.workers.ncclEnv as container env entries (sorted, values as strings). */}}
{{- define "cxrfm.ncclEnv" -}}
{{- range $k := keys (. | default dict) | sortAlpha }}
- name: {{ $k }}
  value: {{ index $ $k | toString | quote }}
{{- end }}
{{- end -}}

{{/* Pod-spec fields of a pod group: scheduling from GPUs and priority, plus the group's `pod:` extension
points. GPU nodes are usually tainted; the product label (GPU feature discovery) pins the kind.
Args: pod (the group's pod map), gpus (int), product, priority (the group default). */}}
{{- define "cxrfm.podScheduling" -}}
{{- $pod := .pod | default dict -}}
{{- $sel := dict -}}
{{- if and (gt (int .gpus) 0) .product -}}
{{- $_ := set $sel "nvidia.com/gpu.product" .product -}}
{{- end -}}
{{- $sel = merge (deepCopy ($pod.nodeSelector | default dict)) $sel -}}
{{- $tol := list -}}
{{- if gt (int .gpus) 0 -}}
{{- $tol = append $tol (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- $tol = concat $tol ($pod.tolerations | default list) -}}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pod.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pod.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pod.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with ($pod.priorityClassName | default .priority) }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Extra pod labels / annotations of a group (`pod.labels`, `pod.annotations`), as metadata lines. */}}
{{- define "cxrfm.podLabels" -}}
{{- with (.labels | default dict) }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cxrfm.podAnnotations" -}}
{{- with (.annotations | default dict) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* POSIX shell quoting of one word (what Python's shlex.quote does): '...' with each ' written '"'"'. */}}
{{- define "cxrfm.shquote" -}}
{{- if regexMatch "^[A-Za-z0-9@%+=:,./_-]+$" . -}}
{{- . -}}
{{- else -}}
{{- printf "'%s'" (replace "'" "'\"'\"'" .) -}}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity in base units (cores, bytes) as a float, for comparisons. */}}
{{- define "cxrfm.quantity" -}}
{{- $q := toString . -}}
{{- $units := dict "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- mulf (float64 $num) (get $units $suffix | default 1.0) -}}
{{- end -}}

{{/* Fails when a request is above its limit (the API server would reject the pod later, per pod). */}}
{{- define "cxrfm.checkResources" -}}
{{- $res := .resources -}}
{{- range $k := list "cpu" "memory" -}}
{{- $req := get $res.requests $k -}}
{{- $lim := get $res.limits $k -}}
{{- if and $req $lim (gt (float64 (include "cxrfm.quantity" $req)) (float64 (include "cxrfm.quantity" $lim))) -}}
{{- fail (printf "%s.resources: requests.%s (%v) is above limits.%s (%v); a request may not exceed its limit" $.where $k $req $k $lim) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Serve config with the GPU choices of serving.workers applied to the cxrfm application: model
deployments ask Ray for GPUs and run on cuda in bfloat16 when the workers have GPUs, on the CPU otherwise. */}}
{{- define "cxrfm.serveConfig" -}}
{{- $cfg := deepCopy .Values.serving.serveConfig -}}
{{- $w := .Values.serving.workers -}}
{{- $gpu := gt (int $w.gpusPerWorker) 0 -}}
{{- range $app := $cfg.applications -}}
{{- if eq $app.import_path "cxrfm.serving.app:build_app" -}}
{{- $args := $app.args | default dict -}}
{{- $_ := set $args "device" (ternary "cuda" "cpu" $gpu) -}}
{{- if and $gpu (not (hasKey $args "dtype")) -}}
{{- $_ := set $args "dtype" "bfloat16" -}}
{{- end -}}
{{- $_ := set $app "args" $args -}}
{{- range $d := $app.deployments | default list -}}
{{- if has $d.name (list "TextGenerator" "ImageGenerator") -}}
{{- $opts := $d.ray_actor_options | default dict -}}
{{- if $gpu -}}
{{- $_ := set $opts "num_gpus" $w.gpusPerReplica -}}
{{- else -}}
{{- $_ := unset $opts "num_gpus" -}}
{{- end -}}
{{- if $opts -}}
{{- $_ := set $d "ray_actor_options" $opts -}}
{{- else -}}
{{- $_ := unset $d "ray_actor_options" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $d := $app.deployments | default list -}}
{{- with $d.autoscaling_config -}}
{{- if and (hasKey . "min_replicas") (hasKey . "max_replicas") (gt (int .min_replicas) (int .max_replicas)) -}}
{{- fail (printf "serving.serveConfig: deployment %s has autoscaling_config.min_replicas (%d) above max_replicas (%d)" $d.name (int .min_replicas) (int .max_replicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* nginx body limit: the API's own cap, max_upload_bytes * 4/3 (base64) + 64 KiB, for the largest tenant. */}}
{{- define "cxrfm.maxBodySize" -}}
{{- if .Values.serving.ingress.maxBodySize -}}
{{- .Values.serving.ingress.maxBodySize -}}
{{- else -}}
{{- $max := 20971520 -}}
{{- $store := fromYaml (.Values.serving.tenants | default "tenants: {}") -}}
{{- range $name, $t := (get $store "tenants" | default dict) -}}
{{- if and (kindIs "map" $t) (hasKey $t "max_upload_bytes") (gt (int64 $t.max_upload_bytes) (int64 $max)) -}}
{{- $max = int64 $t.max_upload_bytes -}}
{{- end -}}
{{- end -}}
{{- printf "%dk" (add (div (add (div (mul $max 4) 3) 65536) 1024) 1) -}}
{{- end -}}
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
