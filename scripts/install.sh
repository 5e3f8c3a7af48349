#!/usr/bin/env bash
# Creates .venv (if missing) and installs surm into it with the pinned CPU build of PyTorch.
# Usage: source scripts/install.sh [extra]   (extra: an optional-dependencies group, e.g. "test")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
extra="${1:-}"
target="$root"
[ -n "$extra" ] && target="$root[$extra]"
# torch==2.13.0 is the CPU wheel this machine holds; an unpinned torch would download a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e "$target"
