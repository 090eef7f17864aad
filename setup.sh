#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine: system packages (the Fashion-MNIST data; a compiler and
# the libraries FFCV builds against), .venv with pinned packages, and the embedded Fashion-MNIST dataset as
# an ImageNet-layout JPEG folder in data/fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")"

packages=(dataset-fashion-mnist g++ pkg-config libopencv-dev libturbojpeg0-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The project itself, editable: `python benchmarks/x.py` and the other scripts import its packages from here.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

.venv/bin/python -m pipeline.fashion_mnist data/fashion-mnist
