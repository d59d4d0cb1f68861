#!/usr/bin/env bash
# Install what is missing, idempotently: a .venv with the package and its dev extras (re-installed only when
# pyproject.toml changes), and, where we are root on Debian, Chromium: plotly's static PNG export and the
# browser the JupyterLab test drives (through the dev extra's playwright, which downloads no browser).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dmvae-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip (not uv/poetry): it finds the local torch 2.14.1 / torchvision 0.29.1 wheels (see shared/guides/environment.md)
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
if [ "${DMVAE_SKIP_CHROMIUM:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Optional: PNG figure export and the browser test. Failure here only means figures are saved as HTML and
  # tests/test_jupyterlab.py skips.
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "note: chromium not installed; figures will be HTML only, the JupyterLab test skips"
fi
