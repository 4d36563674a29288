# Sourced by the other scripts: sets GEOINDEX_PY to the Python of geoindex's environment, creating the
# virtualenv (./.venv, or $GEOINDEX_VENV) on first use unless one is already active.
if [ -n "${VIRTUAL_ENV:-}" ]; then
  GEOINDEX_PY="$VIRTUAL_ENV/bin/python"
  GEOINDEX_VENV_ACTIVATE="$VIRTUAL_ENV/bin/activate"
else
  venv="${GEOINDEX_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv" || {
      echo "could not create a virtualenv in $venv with ${PYTHON:-python3}; on Debian/Ubuntu: apt-get install python3-venv" >&2
      exit 1
    }
  fi
  GEOINDEX_PY="$(cd "$venv" && pwd)/bin/python"
  GEOINDEX_VENV_ACTIVATE="$(cd "$venv" && pwd)/bin/activate"
fi
export GEOINDEX_PY GEOINDEX_VENV_ACTIVATE
