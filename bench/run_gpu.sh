#!/usr/bin/env bash
# GPU benchmark + GPU tests on a lent GPU machine (no internet there).
#
# The image's numpy 2.5 breaks numba-cuda 0.30.4 (np.row_stack was removed) and the tests need
# hypothesis, so bench/fetch_gpu_wheels.sh (run where PyPI is reachable) puts a numpy 2.4.x wheel
# and hypothesis's wheels for the machine's Python (3.12 on the lent H100/H200 image) in the
# ignored folder .whl/; name it in the device call's carry.
# The wheels for this interpreter are installed into a fresh temporary folder put first on PYTHONPATH.
# mdnumba itself runs from the working tree (PYTHONPATH=., before what PYTHONPATH held; with cli/
# linked in as mdnumba/cli where nothing installed it).
#
# Usage: bench/run_gpu.sh [-h | --tests | --tests-only | --tune | --family | --charlm | --profile | --smoke]
#                         [bench_gpu.py / tune_gpu.py options]
#   (none)         the benchmarks: bench_gpu.py (-> gpu.md), bench_family.py --device cuda, then in
#                  what time is left charlm_gpu.py (-> charlm_gpu.md, log appended to bench_gpu.log)
#   --tests        first the real-GPU cases of tests/test_cuda.py (test_gpu: every simulator case
#                  on the GPU, in concurrent shards; the simulator runs themselves are CI's), then
#                  the benchmarks: everything in ONE device call (a session's device time is ~15
#                  minutes, the machine's start included, and one call may run 10)
#   --tests-only   only the tests (cut at the deadline only)
#   --tune         only bench/tune_gpu.py: rows per thread x unrolled steps x threads per block x layout
#                  (x --min-blocks 0,3,4: launch bounds; x --variants full,memory-cell,no-sum,no-cell,neither:
#                  the cell math on global memory, sweep stages left out) -> tune_gpu.md
#   --family       only bench_family.py --device cuda (-> family_cuda.md, with the launcher breakdown)
#   --charlm       only charlm_gpu.py: the device-resident char-LM trainer vs the copying one and the CPU
#   --profile      only Nsight Compute on the sweep and GEMM kernels of bench/profile_gpu.py
#                  (after 2 warm-up steps) at 32x32 B64 D64 and 256x256 B8 D128 -> ncu_*.csv
#                  (clocks left alone; on a gVisor machine ncu reads no counters: then --tune
#                  --variants full,no-sum,no-cell,neither places the time without them)
#   --smoke        as --tests, with the benchmarks' --smoke at tiny sizes: a check that the whole
#                  script runs (CI runs it under NUMBA_ENABLE_CUDASIM=1: the GPU tests skip there);
#                  needs OUT (its numbers are no measurement)
# RUN_GPU_DEADLINE_S (default 570): the seconds the whole script may take (give the device call
# a timeout_s above it). Every part is cut (SIGINT) where it would run past the deadline, the
# tests also at TESTS_MAX_S (default 270) so that the benchmarks get their turn, and the
# benchmark at BENCH_MAX_S (default 300) and FAMILY_MIN_S (default 90) before the deadline so
# that the family benchmark gets one (the char-LM one gets what is left); the parts write
# as they go (gpu.md after every config, the family table after every shape), so a cut part
# keeps what it measured. bench_gpu.py times the two configs with targets (32, 256) first; a part
# that loses the CUDA context (a sticky error: an illegal address) or hangs does not cost the parts
# after it, the run goes on in a fresh process (bench_gpu.py's docstring).
# The report goes to $OUT/gpu.md when $OUT is set (the device tool's output folder), else to
# bench/results/gpu.md (and family_cuda.md from bench_family.py).
set -euo pipefail
cd "$(dirname "$0")/.."

run_tests=0
smoke=0
bench_args=()
family_args=()
charlm_args=()
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -E -e 's/^# ?//'; exit 0 ;;  # this header
  --tests) run_tests=1; shift ;;
  --smoke) run_tests=1; smoke=1; bench_args=(--smoke --configs 4x4x1x2); family_args=(--smoke); charlm_args=(--smoke); shift ;;
  --tests-only) run_tests=2; shift ;;
  --tune) run_tests=tune; shift ;;
  --family) run_tests=family; shift ;;
  --charlm) run_tests=charlm; shift ;;
  --profile) run_tests=profile; shift ;;
esac

if [ $smoke = 1 ] && [ -z "${OUT:-}" ]; then
  echo "--smoke's numbers (tiny sizes, each part once) are no measurement: set OUT to a folder for" \
       "them (they would replace bench/results/gpu.md, family_cuda.md and charlm_gpu.md)" >&2
  exit 2
fi

tag=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheels=$(ls .whl/*.whl 2>/dev/null | grep -E -- "[-.]($tag|py3)-" || true)  # cp312, py3, py2.py3
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086  # one path per wheel, no spaces
  site=$(mktemp -d /tmp/mdnumba_site.XXXXXX)  # fresh: nothing left from another Python or run
  python3 -m pip install -q --no-index --no-deps --target "$site" $wheels \
    || { echo "could not install the carried wheels: $wheels" >&2; exit 1; }
  export PYTHONPATH="$site:.${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "warning: no wheel for $tag in .whl/ ($(ls .whl 2>/dev/null | tr '\n' ' ')); using the image's" \
       "numpy (numba-cuda 0.30.4 does not import with numpy 2.5)" >&2
  export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
# pyproject.toml installs cli/ as mdnumba.cli (the CLI tests import it): with no install, a link
# mdnumba/cli -> ../cli (git ignores it) stands in while the script runs
if ! python3 -c "import mdnumba.cli" 2> /dev/null && [ ! -e mdnumba/cli ]; then
  ln -s ../cli mdnumba/cli
  trap 'rm -f mdnumba/cli' EXIT
  python3 -c "import mdnumba.cli" || echo "warning: mdnumba.cli does not import (the CLI tests will fail)" >&2
fi
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/numba_cache}"
export PYTHONUNBUFFERED=1  # a part killed after its cut keeps every line it printed

out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"

timeout 60 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# Can numba-cuda compile and run a kernel (libNVVM, libdevice) and a cooperative one (cudadevrt)?
# If not, try once more with the libNVVM carried in .whl/cuda_home_nvvm.tgz (fetch_gpu_wheels.sh).
if ! timeout 180 python3 bench/gpu_probe.py 2>&1 | tee "$out_dir/probe.log"; then
  if grep -q "^no CUDA GPU" "$out_dir/probe.log"; then  # no libNVVM helps there
    [ -n "${OUT:-}" ] || rm -f "$out_dir/probe.log"  # not into the repository's results: said above
    echo "run_gpu.sh needs a CUDA GPU and its driver (the probe's words above); nothing was run" >&2
    exit 1
  fi
  if [ -f .whl/cuda_home_nvvm.tgz ]; then
    CUDA_HOME=$(mktemp -d /tmp/mdnumba_cuda_home.XXXXXX)
    export CUDA_HOME
    tar xzf .whl/cuda_home_nvvm.tgz -C "$CUDA_HOME" || echo "warning: could not unpack .whl/cuda_home_nvvm.tgz" >&2
    echo "the CUDA probe failed: again with the carried libNVVM (CUDA_HOME=$CUDA_HOME)" | tee -a "$out_dir/probe.log" >&2
    timeout 180 python3 bench/gpu_probe.py 2>&1 | tee -a "$out_dir/probe.log" \
      || echo "warning: the CUDA probe failed again (see above)" >&2
  else
    echo "warning: the CUDA probe failed (see above; no .whl/cuda_home_nvvm.tgz to try)" >&2
  fi
fi

# Each part runs even if an earlier one failed (a lent GPU is rare: measure what can be);
# the script's exit status says whether all of them passed.
status=0
deadline=${RUN_GPU_DEADLINE_S:-570}
part() {  # part CAP_S CMD...: run CMD, cut at CAP_S or at the deadline, whichever comes first
  local cap=$1 left=$((deadline - SECONDS))
  shift
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "SKIPPED (RUN_GPU_DEADLINE_S=$deadline reached): $*" >&2
    return 1
  fi
  timeout --signal=INT --kill-after=20 "$cap" "$@" || { local rc=$?; [ $rc = 124 ] && echo "CUT after $cap s: $*" >&2; return $rc; }
}
if [ "$run_tests" = profile ]; then
  command -v ncu > /dev/null || { echo "ncu (Nsight Compute) not found" >&2; exit 1; }
  for cfg in 32 256; do  # 3 matching kernels per step: skip the 2 warm-up steps, profile one step
    ncu --clock-control none --target-processes all --kernel-name regex:'_coop|_diag|_gemm_tiled' --launch-skip 6 \
        --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        --csv --page details python3 bench/profile_gpu.py --config "$cfg" \
        > "$out_dir/ncu_$cfg.csv" 2> "$out_dir/ncu_$cfg.log" || status=1
  done
  exit $status
fi
if [ "$run_tests" = tune ]; then
  part "$deadline" python3 bench/tune_gpu.py --out "$out_dir/tune_gpu.md" "$@" 2>&1 \
    | tee "$out_dir/tune_gpu.log" || status=1
  exit $status
fi
if [ "$run_tests" = charlm ]; then
  part "$deadline" python3 bench/charlm_gpu.py --out "$out_dir/charlm_gpu.md" "$@" 2>&1 \
    | tee "$out_dir/charlm_gpu.log" || status=1
  exit $status
fi
if [ "$run_tests" != 0 ] && [ "$run_tests" != family ]; then
  # -k test_gpu: the real-GPU cases only (the simulator cases and ptxcheck run in CI); the shards'
  # own logs and reports go to a temp folder, packed into ONE file of $out_dir (kept when the part
  # is cut): the device tool brings back at most 8 files, and the shards alone write 9
  tests_cap=${TESTS_MAX_S:-270}
  [ "$run_tests" = 2 ] && tests_cap=$deadline
  tmp_tests=$(mktemp -d /tmp/mdnumba_test_cuda.XXXXXX)
  if ! python3 -c "import hypothesis" 2> /dev/null; then  # only the tests need it: measure anyway
    status=1
    echo "the tests need hypothesis: run bench/fetch_gpu_wheels.sh and carry .whl (tests SKIPPED)" \
      | tee "$out_dir/test_cuda.log" >&2
  else
    part "$tests_cap" python3 -m pytest tests/test_cuda.py -k test_gpu -q -p no:cacheprovider \
      --basetemp "$tmp_tests/test_cuda_tmp" 2>&1 | tee "$out_dir/test_cuda.log" \
      || { status=1; echo "CUDA tests FAILED (see $out_dir/test_cuda.log)" >&2; }
    # every GPU case skipped (no usable GPU after all) is no pass (-k test_gpu also selects a
    # host test); the simulator's smoke run skips them by design
    passed=$(grep -oE "[0-9]+ passed" "$out_dir/test_cuda.log" | tail -1 | cut -d' ' -f1 || true)
    if [ "${NUMBA_ENABLE_CUDASIM:-0}" != 1 ] && [ "${passed:-0}" -lt 10 ]; then
      status=1
      echo "only ${passed:-0} CUDA tests passed (GPU cases skipped? see $out_dir/test_cuda.log, probe.log)" >&2
    fi
    tar czf "$out_dir/test_cuda_tmp.tgz" -C "$tmp_tests" test_cuda_tmp 2> /dev/null || true
  fi
  [ "$run_tests" = 2 ] && exit $status
fi

if [ "$run_tests" != family ]; then
  # the family benchmark (issue 6) keeps FAMILY_MIN_S (default 90) of the deadline for itself
  bench_cap=$(( deadline - SECONDS - ${FAMILY_MIN_S:-90} ))
  [ "$bench_cap" -gt "${BENCH_MAX_S:-300}" ] && bench_cap=${BENCH_MAX_S:-300}
  part "$bench_cap" python3 bench/bench_gpu.py --out "$out_dir/gpu.md" ${bench_args[@]+"${bench_args[@]}"} "$@" 2>&1 \
    | tee "$out_dir/bench_gpu.log" || status=1
fi
# issue 6: 4-direction 2D and 3D layers vs PyTorch autograd on the same GPU
part "$deadline" python3 bench/bench_family.py --device cuda ${family_args[@]+"${family_args[@]}"} \
  --out "$out_dir/family_cuda.md" 2>&1 \
  | tee "$out_dir/bench_family.log" || status=1
# the device-resident char-LM trainer, in what is left (at most CHARLM_S, default 90; with less
# than 30 s left it is not started, which is no failure); its log joins bench_gpu.log (the
# device tool brings back at most 8 files)
if [ "$run_tests" != family ] && [ $((deadline - SECONDS)) -ge 30 ]; then
  part "${CHARLM_S:-90}" python3 bench/charlm_gpu.py --budget 3 ${charlm_args[@]+"${charlm_args[@]}"} \
    --out "$out_dir/charlm_gpu.md" 2>&1 | tee -a "$out_dir/bench_gpu.log" || status=1
elif [ "$run_tests" != family ]; then
  echo "charlm_gpu.py not started: under 30 s left (bench/run_gpu.sh --charlm runs it alone)" >&2
fi
exit $status
