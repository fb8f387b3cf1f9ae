#!/usr/bin/env bash
# The device check on a GPU machine: installs what the image lacks from the wheel folder (made by
# benchmarks/device_wheels.sh), then runs benchmarks/device_check.py with the same arguments.
#
#   bash benchmarks/device_check.sh OUT [device_check.py options]
#
# Only wheels whose package is not installed are installed (--no-deps: nothing of the image is replaced).
# On a machine with a registry, `pip install -e ".[test]" liger-kernel` does the same and no wheel folder is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the interpreter that has torch
    for cand in python3 python; do
        if command -v "$cand" > /dev/null && "$cand" -c 'import torch' 2> /dev/null; then PY=$cand; break; fi
    done
    PY=${PY:-python3}
fi
WHEELS=${DEVICE_WHEELS:-.device-wheels}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    # an offline machine lent for the check: its interpreter may be a distribution's (PEP 668)
    export PIP_BREAK_SYSTEM_PACKAGES=1
    missing=()
    for whl in "$WHEELS"/*.whl; do
        dist=$(basename "$whl" | cut -d- -f1)
        "$PY" -c 'import sys, importlib.metadata as m; m.distribution(sys.argv[1])' "$dist" 2>/dev/null \
            || missing+=("$whl")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${#missing[@]} wheel(s) from $WHEELS"
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "${missing[@]}" \
            || echo "warning: installing the wheels failed; the steps that need them will record the error"
    fi
fi

# the project itself (kernels/ installs as semalign_ds.kernels); --use-pep517: an older pip's legacy `setup.py
# develop` installs build dependencies from the registry, which an offline machine does not reach
link=""
if ! "$PY" -c 'import semalign_ds.kernels' 2> /dev/null; then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --use-pep517 -e . ; then
        echo "warning: pip install -e . failed; using the checkout through PYTHONPATH"
        ln -sfn ../kernels semalign_ds/kernels
        link=semalign_ds/kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

"$PY" benchmarks/device_check.py "$@"
code=$?
[ -n "$link" ] && rm -f "$link"
exit $code
