#!/usr/bin/env bash
# Install everything fibgraph needs on a fresh Debian machine with Python 3.11:
# Debian packages (fonts for the pictures), then the package itself.
#   ./setup.sh         the package and its runtime dependencies (ONNX path, no torch)
#   ./setup.sh --dev   also torch (CPU build 2.13.0), training examples and the test tools
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s fontconfig fonts-dejavu-core >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || echo "setup: apt-get update failed; continuing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      fontconfig fonts-dejavu-core >/dev/null 2>&1 || echo "setup: could not install fonts; pictures fall back to built-in fonts" >&2
  fi
fi
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --upgrade "pip>=23" "setuptools>=64" wheel
if [ "${1:-}" = "--dev" ]; then
  # the CPU build; any other torch spec pulls gigabytes of CUDA packages
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[dev]"
else
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
fi
