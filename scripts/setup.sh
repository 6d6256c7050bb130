#!/usr/bin/env bash
# One-step set-up from a fresh clone: pinned CPU dependencies, Fashion-MNIST (Debian package), and cadk
# with its C++ extension built in place. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m pip install -q -r requirements-cpu.txt
python -m pip install -q --no-deps --no-build-isolation -e .
python -m cadk info
