#!/usr/bin/env bash
# Python 3.13 (Colab's Python since 2026-08-25) for everything in relgrad that does not need torch: a venv from
# pyenv's 3.13 with Colab's numpy/scipy/scikit-learn/tqdm (tools/colab-runtime.txt), relgrad installed from
# this checkout (not editable, as a user gets it), then the NumPy twin's, the datasets' and the utilities'
# tests and the torch-free doctests. (torch for CPU exists on this machine only for Python 3.11.)
#
# Environment: PY313  the interpreter (default: pyenv's 3.13.x, else python3.13 on PATH)
#              VENV   where to make the venv (default: a temporary folder, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
PY313=${PY313:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13.*/bin/python3.13 2>/dev/null | tail -1)}
PY313=${PY313:-$(command -v python3.13 || true)}
[ -x "$PY313" ] || { echo "no Python 3.13 found (set PY313=/path/to/python3.13)"; exit 1; }
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
VENV=${VENV:-$WORK/venv}
T0=$(date +%s)
"$PY313" -m venv "$VENV"
pin() { grep -iE "^$1==" "$2" | head -1; }          # NAME==VERSION of a requirements-format file
RUNTIME=tools/colab-runtime.txt
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  "$(pin numpy $RUNTIME)" "$(pin scipy $RUNTIME)" "$(pin scikit-learn $RUNTIME)" "$(pin tqdm $RUNTIME)" \
  "$(pin pytest requirements.txt)" "$(pin hypothesis requirements.txt)" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps . 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import sys, numpy, scipy, sklearn; print('python', sys.version.split()[0], '| numpy', numpy.__version__, '| scipy', scipy.__version__, '| scikit-learn', sklearn.__version__)"
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch is installed'; print('torch: not installed (the torch tests skip)')"
echo "install: $(( $(date +%s) - T0 ))s"
# from a folder outside the checkout, so `import relgrad` is the installed package; no nbval (not installed)
cp -r tests "$WORK/tests"
cd "$WORK"
"$VENV/bin/python" -m pytest -q -o addopts="-p no:cacheprovider" --rootdir "$WORK" \
  tests/test_numpy_activation.py tests/test_numpy_flow.py tests/test_numpy_gradients.py tests/test_numpy_train.py \
  tests/test_datasets.py tests/test_utils.py tests/test_doctests.py
echo "py313 check passed in $(( $(date +%s) - T0 ))s"
