#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the GPU image lacks for the engine's CUDA tests: pydantic (the
# recipe schema) and its dependencies, for the image's Python 3.12 on x86-64 Linux, into the git-ignored .whl/.
# `kernels/gpu_check.sh` installs them there (pip install --no-index --target) when pydantic is missing; the
# device call names `.whl` in `carry`. The versions are the ones this repository is tested with.
#
#   bash kernels/gpu_wheels.sh          # from the repo root; ~2.5 MB
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.16.0)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -la .whl
