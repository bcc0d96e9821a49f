#!/usr/bin/env bash
# On a bare GPU machine with no network (the lent H100/H200): install qfx from this checkout and
# build the native library for sm_90a (+ compute_80 PTX for Ampere exactness checks) with 16 jobs.
# Needs the nvidia-cutlass wheel (headers) in .whl/ (`pip download --no-deps --only-binary=:all: --python-version 3.12
# -d .whl nvidia-cutlass==4.2.0.0` on a machine with network); a prebuilt
# backends/cutlass/libqfx_cutlass.so.xz (carried) is unpacked instead of building when present
# and QFX_REBUILD is not 1.
#   source benchmarks/device_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
lib=backends/cutlass/libqfx_cutlass.so
if [ -f "$lib.xz" ] && [ "${QFX_REBUILD:-0}" != 1 ]; then
  xz -dkf "$lib.xz"
  [ -f backends/cutlass/qfx_cutlass_manifest.json.xz ] && xz -dkf backends/cutlass/qfx_cutlass_manifest.json.xz
  export QFX_SKIP_NATIVE=1
fi
QFX_CUDA_ARCHS="${QFX_CUDA_ARCHS:-80;90a}" QFX_BUILD_JOBS=16 \
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import qfx; from qfx.backends.cutlass import available; print('qfx', qfx.__version__, 'cutlass:', available())"
set +e
