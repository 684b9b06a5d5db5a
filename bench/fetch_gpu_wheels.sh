#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels bench/run_gpu.sh installs on a lent GPU machine
# (no internet there) into the ignored folder .whl/; name ".whl" in the device call's carry.
#   numpy 2.4.x  - the image's numpy 2.5 breaks numba-cuda 0.30.4 (np.row_stack was removed)
#   hypothesis   - tests/test_cuda.py's drawn-shape case (and its pure-Python dependencies)
#   cuda_home_nvvm.tgz - libNVVM and libdevice from the nvidia-nvvm 13.0 wheel (the oldest CUDA 13
#                  one: its PTX loads on any CUDA 13 driver) and the static cudadevrt (cooperative
#                  launches link it) of nvidia-cuda-runtime 13.0, in a CUDA_HOME layout, for an image
#                  without them: run_gpu.sh points CUDA_HOME at it only when bench/gpu_probe.py
#                  cannot compile a kernel (the nvvm wheel itself, 62 MB, would not fit the carry)
# Usage: bench/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the lent image's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
rm -f .whl/*.whl  # two numpy wheels (an older fetch's) would make run_gpu.sh's install fail
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  'numpy>=2.4,<2.5' 'hypothesis>=6'
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 -d "$tmp" 'nvidia-nvvm==13.0.*' \
  'nvidia-cuda-runtime==13.0.*'
python3 - "$tmp" <<'EOF'
import io, sys, tarfile, zipfile
from pathlib import Path
# the CUDA_HOME layout numba-cuda searches: nvvm/lib64/libnvvm.so*, nvvm/libdevice/libdevice.10.bc,
# lib64/libcudadevrt.a
want = {"nvidia_nvvm-": {"nvidia/cu13/lib/libnvvm.so.4": "nvvm/lib64/libnvvm.so.4",
                         "nvidia/cu13/nvvm/libdevice/libdevice.10.bc": "nvvm/libdevice/libdevice.10.bc"},
        "nvidia_cuda_runtime-": {"nvidia/cu13/lib/libcudadevrt.a": "lib64/libcudadevrt.a"}}
with tarfile.open(".whl/cuda_home_nvvm.tgz", "w:gz") as tar:
    for prefix, files in want.items():
        wheel = next(Path(sys.argv[1]).glob(prefix + "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for src, dst in files.items():
                data = z.read(src)
                info = tarfile.TarInfo(dst)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
        print(f"  {', '.join(files.values())} from {wheel.name}")
    link = tarfile.TarInfo("nvvm/lib64/libnvvm.so")
    link.type, link.linkname = tarfile.SYMTYPE, "libnvvm.so.4"
    tar.addfile(link)
print("wrote .whl/cuda_home_nvvm.tgz")
EOF
ls -la .whl
