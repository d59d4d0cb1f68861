#!/usr/bin/env bash
# The main job: install what is missing, then run every notebook in order through papermill at the `cpu`
# preset into runs/. Extra arguments go to the pipeline (e.g. --preset smoke, --name myrun).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m dmvae_lib --preset cpu "$@"
