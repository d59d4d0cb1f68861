#!/usr/bin/env bash
# The whole test suite: unit tests, then nbval over notebooks/ (every notebook executed at its default,
# the `smoke` preset). Installs what is missing first, Chromium included where we are root on Debian: the
# JupyterLab browser test (tests/test_jupyterlab.py, ~15 min) needs it and skips, saying so, without it
# (DMVAE_SKIP_CHROMIUM=1 skips the install). Never downloads weights (HF_HUB_OFFLINE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export DMVAE_RUNS=${DMVAE_RUNS:-$(mktemp -d -t dmvae-test-runs.XXXXXX)}
# The committed .ipynb files are output-free copies of the .py sources; tests/test_notebook_sync.py fails if
# they drift. nbval then executes them (cells marked NBVAL_CHECK_OUTPUT are also compared).
.venv/bin/python -m pytest tests "$@"
.venv/bin/python -m pytest --nbval-lax --durations=10 -p no:cacheprovider notebooks/
