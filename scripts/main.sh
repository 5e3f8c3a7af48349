#!/usr/bin/env bash
# The main job: installs what it needs, then runs surm's default command (no network, no flags).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
export HF_HUB_OFFLINE=1
surm "$@"
