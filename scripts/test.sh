#!/usr/bin/env bash
# Installs surm with its test dependencies, then runs the test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh" test
export HF_HUB_OFFLINE=1
python -m pytest "$@"
