#!/usr/bin/env bash
# The main job: set up, then run notebooks 01-06 on papermill_params/demo.yaml into runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m rephelpers run "${1:-papermill_params/demo.yaml}"
