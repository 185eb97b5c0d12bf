# Shared by scripts/demo and scripts/test: make .venv and install the project into it.
# Usage: source scripts/_venv.sh EXTRAS   (EXTRAS: "" for the core, "[test]" for the test suite)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
# The constraints pin torch==2.13.0 (a CPU build) and every test dependency.
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".$1"
# An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set every process would
# compile the sources again (50 ms before the first load): compile them once here, as a wheel install does.
.venv/bin/python -m compileall -q src/weightport > /dev/null
