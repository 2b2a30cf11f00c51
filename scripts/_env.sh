# Sourced by scripts/run and scripts/test: make .venv and install optserve into it.
# OPTSERVE_EXTRAS picks the extras (default: everything the tests need).
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${OPTSERVE_VENV:-.venv}

step() { printf '\n==> %s\n' "$*" >&2; }

ensure_venv() {
    local extras=${1:-dev,server,client}
    if [ ! -x "$VENV/bin/python" ]; then
        step "creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    step "installing optserve[$extras] into $VENV"
    local log
    log=$(mktemp)
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e ".[$extras]" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "installing optserve[$extras] failed" >&2
        exit 1
    fi
    # the machine's pip config may name local index folders that are absent: hide that noise
    grep -v "^WARNING: Location 'file://" "$log" >&2 || true
    rm -f "$log"
}
