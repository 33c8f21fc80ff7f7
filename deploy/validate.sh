#!/usr/bin/env bash
# Validate the deployment files in deploy/ with the real tools.
#
#   deploy/validate.sh
#
# Installs nothing. Needs on PATH: systemd-analyze (systemd >= 250),
# kubernetes-validate, helm (v3 or v4) and checkov. See docs/deploy.md for how
# to get them. Exit status: 0 all checks passed, 1 a check failed, 2 a tool is
# missing.
#
# Environment:
#   MAX_EXPOSURE   fail if `systemd-analyze security` scores the unit above this
#                  (default 4.0; the unit scores 3.0 with systemd 252)
#   K8S_VERSIONS   Kubernetes versions to validate against
#                  (default "1.30.0 latest"; 1.30 is the minimum, for appArmorProfile)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root" || exit 2

MAX_EXPOSURE=${MAX_EXPOSURE:-4.0}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 latest"}

missing=()
for tool in systemd-analyze kubernetes-validate helm checkov; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "validate.sh: missing tool(s) on PATH: ${missing[*]}" >&2
    echo "validate.sh: see docs/deploy.md, section 'Validating the files'" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=()
step() { printf '\n==> %s\n' "$*"; }
check() { # check NAME CMD... : run, record failure
    local name=$1
    shift
    if "$@"; then
        echo "--- ok: $name"
    else
        echo "--- FAILED: $name"
        failed+=("$name")
    fi
}

unit=deploy/systemd/leakmon.service

# systemd-analyze verify insists that ExecStart= binaries exist. If leakmon is
# not installed here, verify a copy whose commands point at a dummy script.
unit_to_verify=$unit
if [[ ! -x /usr/local/bin/leakmon ]]; then
    mkdir -p "$tmp/unit" "$tmp/bin"
    printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/leakmon"
    chmod 755 "$tmp/bin/leakmon"
    sed "s|/usr/local/bin/leakmon|$tmp/bin/leakmon|g" "$unit" >"$tmp/unit/leakmon.service"
    unit_to_verify=$tmp/unit/leakmon.service
    echo "note: /usr/local/bin/leakmon not installed; verifying a copy of the unit with a dummy binary"
fi

step "systemd-analyze verify $unit"
check "systemd-analyze verify" systemd-analyze verify "$unit_to_verify"

step "systemd-analyze security --offline=yes $unit"
security_out() {
    systemd-analyze security --offline=yes --no-pager "$unit_to_verify" >"$tmp/security.txt" 2>&1
    local rc=$?
    grep '✗' "$tmp/security.txt" | sed 's/  */ /g'
    grep 'Overall exposure level' "$tmp/security.txt"
    return $rc
}
exposure_ok() {
    local score
    score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$tmp/security.txt")
    [[ -n $score ]] || { echo "could not read the exposure score"; return 1; }
    awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' ||
        { echo "exposure $score > MAX_EXPOSURE $MAX_EXPOSURE"; return 1; }
    echo "exposure $score <= $MAX_EXPOSURE"
}
check "systemd-analyze security" security_out
check "exposure <= $MAX_EXPOSURE" exposure_ok

step "helm lint --strict deploy/helm/leakmon"
check "helm lint" helm lint --strict deploy/helm/leakmon

step "helm template (default values, a full set of options, the privileged fallback)"
render() { # render NAME helm-template-args...
    local name=$1
    shift
    helm template leakmon deploy/helm/leakmon --namespace leakmon "$@" >"$tmp/$name.yaml"
}
check "helm template default" render helm-default
check "helm template options" render helm-options \
    --set-string 'config=# leakmon.toml
' \
    --set otlp.endpoint=http://otel-collector.observability.svc:4317 \
    --set otlp.protocol=grpc \
    --set bpffs.enabled=true \
    --set image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000 \
    --set-json 'extraEnv=[{"name":"EXTRA","value":"1"}]' \
    --set-json 'serviceAccount.annotations={"example.com/owner":"sre"}'
check "helm template privileged" render helm-privileged --set privileged=true --set priorityClassName=

for version in $K8S_VERSIONS; do
    kv=()
    [[ $version == latest ]] || kv=(-k "$version")
    step "kubernetes-validate --strict ${kv[*]} (manifest and rendered chart)"
    check "kubernetes-validate $version manifest" \
        kubernetes-validate --strict "${kv[@]}" deploy/kubernetes/daemonset.yaml
    for name in helm-default helm-options helm-privileged; do
        [[ -s $tmp/$name.yaml ]] || continue
        check "kubernetes-validate $version $name" \
            kubernetes-validate --strict "${kv[@]}" "$tmp/$name.yaml"
    done
done

step "checkov -d deploy/ --quiet --compact --skip-download"
check "checkov deploy/" checkov -d deploy/ --quiet --compact --skip-download

# checkov only recognises files named *Dockerfile*.
step "checkov on deploy/container/Containerfile (as a Dockerfile)"
mkdir -p "$tmp/container"
cp deploy/container/Containerfile "$tmp/container/Dockerfile"
check "checkov Containerfile" \
    checkov -f "$tmp/container/Dockerfile" --framework dockerfile --quiet --compact --skip-download

echo
if ((${#failed[@]})); then
    echo "FAILED: ${#failed[@]} check(s): ${failed[*]}"
    exit 1
fi
echo "all deployment checks passed"
