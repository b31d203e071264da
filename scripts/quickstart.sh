#!/usr/bin/env bash
# One entry point for the README's quick start and for CI.
#
#   bash scripts/quickstart.sh demo [demo args...]   set up, then run the embedded toy demo
#   bash scripts/quickstart.sh test [pytest args...] set up with test extras, then run the test suite
#
# Set-up: a virtual environment in $RDT_VENV (default .venv) is created if missing. Inside an already
# active virtual environment ($VIRTUAL_ENV) or with RDT_VENV=none, the current python is used instead.
# torch: an installed torch is never replaced; where none is importable, the pinned $RDT_TORCH
# (default torch==2.13.0) is installed first, so pip does not pull a multi-GB CUDA build by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  demo|test) shift ;;
  *) echo "usage: bash scripts/quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac

venv="${RDT_VENV:-.venv}"
if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${RDT_VENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
elif [ "$venv" = "none" ]; then
  py="$(command -v python3 || command -v python)"
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "[rdt] creating virtual environment in $venv"
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[rdt] no torch found: installing ${RDT_TORCH:-torch==2.13.0}"
  "$py" -m pip install -q "${RDT_TORCH:-torch==2.13.0}"
else
  echo "[rdt] using the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
fi

extras=""
[ "$mode" = "test" ] && extras="[test]"
# Re-install only when the project metadata changed since the last install into this interpreter.
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.rdt-install-stamp"
want="$(cat pyproject.toml requirements.txt 2>/dev/null | sha256sum | cut -c1-16)$extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$py" -c "import rdt_lib" >/dev/null 2>&1; then
  echo "[rdt] installing rdt${extras} and its dependencies"
  "$py" -m pip install -q --disable-pip-version-check -e ".${extras}"
  echo "$want" > "$stamp" 2>/dev/null || true
fi

if [ "$mode" = "demo" ]; then
  exec "$py" -m rdt_lib.demo "$@"
fi
set +e
"$py" -m pytest "$@"
rc=$?
# pytest exits 5 when no test was collected: that is a failure of the suite, not a pass.
exit $rc
