#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (its image has jax, flax, optax, orbax, chex, transformers, torch,
# tokenizers, numba, ...; not these), for Python 3.12 on x86-64 Linux, into .whl/ at the repository root
# (ignored by git), at the versions this environment runs. bench/device_run.sh installs them there.
#   bash bench/device_wheels.sh        # once, here, with the project's environment active
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(grain array-record portpicker ml-collections tensorboardX
          librosa audioread soxr pooch platformdirs decorator soundfile cffi pycparser fastapi starlette pydantic
          pydantic-core annotated-types typing-inspection opentelemetry-api uvicorn python-multipart jiwer
          whisper-normalizer rapidfuzz)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf .whl && mkdir .whl
for name in "${PACKAGES[@]}"; do
  version=$(python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "error: $name is not installed here; install the project's extras first" >&2; exit 1; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl "$name==$version"
done
du -sh .whl
