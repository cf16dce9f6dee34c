#!/usr/bin/env bash
# Set up, then run the unit tests and every notebook (nbmake) with papermill_params/ci.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Notebooks get CI-sized parameters injected (papermill) into runs/_nbmake/, then nbmake runs them in order.
python -m rephelpers parameterize papermill_params/ci.yaml --out runs/_nbmake --run-dir runs/ci_nbmake
python -m pytest tests runs/_nbmake --nbmake --nbmake-timeout=1200 -p no:cacheprovider --durations=25 "$@"
