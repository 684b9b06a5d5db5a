#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/run_gpu.sh installs on a lent GPU machine
# (no internet there) into the ignored folder .whl/; name ".whl" in the device call's carry.
#   numpy 2.4.x  - the image's numpy 2.5 breaks numba-cuda 0.30.4 (np.row_stack was removed)
#   hypothesis   - tests/test_cuda.py's drawn-shape case (and its pure-Python dependencies)
# Usage: bench/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the lent image's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  'numpy>=2.4,<2.5' 'hypothesis>=6'
ls .whl
