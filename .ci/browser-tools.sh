#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver for tests/browser: Debian's chromium and
# chromium-driver packages (selenium itself comes with the test extra). .ci/run runs this as root
# and then sets SIDECAR_REQUIRE_BROWSER=1, so that a missing browser fails the browser tests there
# instead of skipping them.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
chromedriver --version
