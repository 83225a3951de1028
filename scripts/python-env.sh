# shellcheck shell=bash
# Project-local Python for the provisioning scripts: makes `.venv/` at the repository root with
# `python3 -m venv` and installs numpy into it when it is missing. Nothing else is installed or
# upgraded; when the venv is already complete this prints nothing.
#
# Sourced by the other scripts in scripts/ (`source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"`);
# afterwards DIREDI_REPO_ROOT is the repository root and DIREDI_PYTHON the venv's python.
# Run directly (`bash scripts/python-env.sh`) it just prepares the venv and prints the python path.
# Set DIREDI_BASE_PYTHON to create the venv with another interpreter than `python3`.

diredi_python_env() {
    local here root venv py
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)" || return 1
    root="$(cd "$here/.." && pwd -P)" || return 1
    venv="$root/.venv"
    py="$venv/bin/python"

    if [[ ! -x "$py" ]] || ! "$py" -c '' >/dev/null 2>&1; then
        local base="${DIREDI_BASE_PYTHON:-python3}"
        if ! command -v "$base" >/dev/null 2>&1; then
            echo "python-env: '$base' not found; install Python 3 (3.9 or newer) or set DIREDI_BASE_PYTHON" >&2
            return 1
        fi
        echo "python-env: creating $venv" >&2
        rm -rf "$venv"
        if ! "$base" -m venv "$venv" >&2; then
            echo "python-env: '$base -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2
            rm -rf "$venv"
            return 1
        fi
    fi

    if ! "$py" -c 'import numpy' >/dev/null 2>&1; then
        echo "python-env: installing numpy into $venv" >&2
        if ! "$py" -m pip install --quiet --disable-pip-version-check numpy >&2; then
            echo "python-env: 'pip install numpy' into $venv failed (is PyPI reachable?)" >&2
            return 1
        fi
        if ! "$py" -c 'import numpy' >/dev/null 2>&1; then
            echo "python-env: numpy was installed but does not import in $venv" >&2
            return 1
        fi
    fi

    DIREDI_REPO_ROOT="$root"
    DIREDI_PYTHON="$py"
    export DIREDI_REPO_ROOT DIREDI_PYTHON
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    diredi_python_env
    echo "$DIREDI_PYTHON"
else
    diredi_python_env || return 1
fi
