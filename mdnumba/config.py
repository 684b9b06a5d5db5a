"""Central configuration: default dtype, fastmath, CUDA launch sizes.

Every kernel module reads its compile options from here so there is exactly one
place to change them. Environment variables override the defaults:

- ``MDNUMBA_FASTMATH=1`` compiles the CPU kernels with the fast-math flags of
  :data:`FASTMATH_FLAGS` and the CUDA sweeps and GEMMs with ``fastmath=True`` (loses the
  bit-exact agreement with the reference; the CUDA losses, norms and optimisers stay exact).
- ``MDNUMBA_THREADS_PER_BLOCK`` sets the CUDA block size (default 128, at most 256: the
  sweep kernels use up to ~250 registers per thread in float64, and an SM has 65,536).
- ``MDNUMBA_CUDA_ROWS_PER_THREAD`` sets how many batch rows one CUDA sweep thread
  computes (default 2, the fastest on an H200, bench/results/tune_gpu.md): each recurrent
  weight it loads serves that many rows.
- ``MDNUMBA_CUDA_UNROLL`` sets how many steps of a CUDA sweep thread's inner sum load
  their operands together before multiplying (default 8): more loads in flight per thread.
- ``MDNUMBA_CUDA_LAYOUT`` sets how the CUDA sweeps share out a hyperplane's work: ``flat`` (work items
  spread over the whole grid, the recurrent weights read from global memory unless all of them fit in
  shared memory), ``sliced`` (each block owns a fixed slice of hidden units of one scan and keeps just
  those units' weights in shared memory for the whole sweep; see :mod:`mdnumba.kernels.wavefront_cuda`),
  ``staged`` (sliced, and each block reads the rows of h (forward) and of the gate gradients (backward)
  its threads sum over through tiles it loads into shared memory together; the slowest on an H100),
  ``item`` (a block per batch item and scan, holding all of U and one hyperplane's rows in opt-in shared
  memory, with block barriers instead of grid syncs between hyperplanes: one plain launch per sweep, for
  small hidden sizes, e.g. D = 64 in float32; ``MDNUMBA_CUDA_ITEM_THREADS`` threads per block, default
  512, each on ``MDNUMBA_CUDA_ITEM_ROWS`` cells of an anti-diagonal, default 4; the fastest train step
  at 32x32 B64 D64 on an H100, bench/results/gpu.md), ``tensor`` (the sliced layout's work split in
  16-row x 8-unit tiles whose recurrent sums run on tensor cores, ``mma.sync`` with the 3xTF32 split:
  float32 accuracy; float32 layers of 1 to 3 dimensions, the saving-free sweep flat;
  :mod:`mdnumba.kernels.tensor_cuda`; on an H100 1.6-1.9x faster than flat and sliced per train step at
  256x256 B8 D128) or ``auto`` (default: float32 layers of 2+ dimensions and at least 64 hidden units
  sweep forward and backward in the tensor layout where it can run,
  ``wavefront_cuda.AUTO_TENSOR_MIN_UNITS``; otherwise the faster of flat and sliced per sweep on an
  H200: the backward sweep sliced, the forward ones flat, ``wavefront_cuda.AUTO_LAYOUT``).
  ``MDNUMBA_CUDA_SLICE_UNITS`` sets the units per slice (default 8; compile-time).
  ``MDNUMBA_CUDA_TENSOR_TILES`` sets the tensor layout's n-tiles of 8 units per warp in the backward
  sweep (default 2, 1 to 4; compile-time: its slices are 8x that many units, and each row operand it
  loads and splits serves that many mma).
- ``MDNUMBA_CUDA_SKIP`` is a **diagnostic** for timing the CUDA sweeps, a comma list of stages
  their threads skip: ``sum`` (the recurrent sums, forward ``Σ h·U`` and backward ``Σ δ·Uᵀ``:
  every result is then that of recurrent weights U = 0) and ``cell`` (the cells' gate math:
  h, c and the gradients stay as they were). Loads, stores of the pre-activations and grid
  syncs stay, so a sweep's time with and without each stage places it (``bench/tune_gpu.py
  --variants``, for a GPU whose profiler reads no counters); mdnumba warns when it is set, and
  ``mdnumba info`` says so.
- ``MDNUMBA_CUDA_MIN_BLOCKS`` compiles the CUDA sweep kernels for at least that many blocks of
  ``MDNUMBA_THREADS_PER_BLOCK`` threads per SM (launch bounds: ptxas caps their registers at
  65,536 / (blocks x threads) and spills the rest to local memory); default 0, no bound (the
  2-D flat forward sweep then takes ~250 registers: 2 blocks of 128 per SM). Compile-time; for
  ``bench/tune_gpu.py --min-blocks``.
- ``MDNUMBA_CUDA_PREPARED_LAUNCH=0`` launches every CUDA kernel through numba-cuda's dispatcher,
  instead of reusing the launch fields it made the first time for the same arguments
  (:mod:`mdnumba.kernels.launch`; default 1).
- ``MDNUMBA_CUDA_CELL_REGISTERS=0`` makes the CUDA sweeps of 1- to 3-D layers run the cell
  math on global memory, as 4-D and larger ones always do, instead of on the thread's
  registers (default 1; compile-time): a timing comparison (``bench/tune_gpu.py --variants``),
  the results are the same.

Importing mdnumba sets ``GOMP_SPINCOUNT=3000`` unless the environment already has it:
the CPU drivers open one OpenMP region per anti-diagonal, and with GNU OpenMP's default
(threads spin 300,000 iterations before sleeping) two mdnumba processes on the same
2 cores each ran a 32x32 fwd+bwd 105x slower than one alone, with 3000 3.6x, and alone
both cost the same (bench/results/threads.md). It takes effect if GNU OpenMP is not
loaded yet (e.g. by torch) when mdnumba's first parallel kernel runs.

It also sets ``NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0`` unless given: numba-cuda warns at every
launch of a grid under 128 blocks, which the per-diagonal sweeps, the reductions and the
small layers launch by design (a message per launch, and its cost, several µs, in every
timed per-diagonal sweep). It takes effect if ``numba.cuda`` is not imported before mdnumba.

Importing mdnumba also keeps freed arrays of up to 256 MiB in the process's heap for reuse
(glibc ``mallopt``, :func:`tune_malloc`), unless ``MDNUMBA_MALLOC_TUNING=0`` or the
environment sets glibc's thresholds itself: by default glibc hands such blocks back to the
OS and every fresh array faults its pages in again, zeroed (a layer's output, a loss
gradient: ~1,150 page faults per 32x32 B16 D32 train step, 12–20% of its time).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
import numpy.typing as npt

#: GNU OpenMP spin iterations before a waiting thread sleeps (see the module docstring)
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
#: numba-cuda's warning at each launch of fewer than 128 blocks (see the module docstring)
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

DEFAULT_DTYPE = np.float32
SUPPORTED_DTYPES = (np.float32, np.float64)


class ConfigError(ValueError):
    """A bad ``MDNUMBA_*`` environment variable (raised while mdnumba is imported)."""


def _report_config_errors_briefly() -> None:
    """Make an uncaught :class:`ConfigError` print ``Error: <what to fix>`` instead of a traceback
    through mdnumba's import: the ``mdnumba`` command cannot catch an error raised while its own
    package is imported. Other exceptions keep Python's display."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, ConfigError):
            print(f"Error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)
    sys.excepthook = hook


def _check_numba_threads() -> None:
    """``NUMBA_NUM_THREADS``, read by Numba when it is first imported, must be an integer >= 1 if
    set: Numba raises a traceback on 0 and ignores other text without a word."""
    raw = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if raw and not (raw.isdecimal() and raw.isascii() and int(raw) >= 1):
        _report_config_errors_briefly()
        raise ConfigError(f"environment variable NUMBA_NUM_THREADS={raw!r}: use an integer >= 1 "
                          "(the CPU threads; unset it to use every core)")


_check_numba_threads()
from . import kernel_cache  # noqa: E402  (imports Numba, which reads NUMBA_NUM_THREADS)


def env_flag(name: str, default: bool) -> bool:
    """``name`` as a boolean: 1/true/yes/on or 0/false/no/off (any case); unset: ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {name}={os.environ[name]!r}: use 1 or 0")


def env_subset(name: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """``name`` as a comma list of some of ``choices`` (in their order); unset or empty: ()."""
    parts = {p.strip() for p in os.environ.get(name, "").lower().split(",") if p.strip()}
    if not parts <= set(choices):
        raise ConfigError(f"environment variable {name}={os.environ[name]!r}: use a comma list of "
                          f"{', '.join(choices)}, or leave it unset")
    return tuple(c for c in choices if c in parts)


#: the integer settings' ranges, environment variable -> (low, high): :func:`env_int` reads them, and
#: ``bench/tune_gpu.py`` checks its lists of settings against them before it runs a combination
INT_RANGES = {"MDNUMBA_THREADS_PER_BLOCK": (1, 256), "MDNUMBA_CUDA_ROWS_PER_THREAD": (1, 64),
              "MDNUMBA_CUDA_UNROLL": (1, 16), "MDNUMBA_CUDA_SLICE_UNITS": (1, 64),
              "MDNUMBA_CUDA_ITEM_THREADS": (1, 1024), "MDNUMBA_CUDA_ITEM_ROWS": (1, 64),
              "MDNUMBA_CUDA_TENSOR_TILES": (1, 4), "MDNUMBA_CUDA_MIN_BLOCKS": (0, 32)}


def env_int(name: str, default: int) -> int:
    """``name`` as an integer in its :data:`INT_RANGES` range [low, high]; unset: ``default``."""
    low, high = INT_RANGES[name]
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"environment variable {name}={raw!r}: use an integer in [{low}, {high}]")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """``name`` as one of ``choices``; unset: ``default``."""
    raw = os.environ.get(name, "").strip()
    if raw and raw not in choices:
        raise ConfigError(f"environment variable {name}={raw!r}: use one of {', '.join(choices)}")
    return raw or default


#: glibc ``mallopt`` parameters and the values :func:`tune_malloc` gives them: blocks below the
#: mmap threshold come from the heap, and free space at the heap's top is handed back to the OS
#: only beyond the trim threshold (glibc's defaults adapt between 128 KiB and 32 MiB / 64 MiB)
MALLOC_SETTINGS = {"mmap threshold": (-3, 256 << 20), "trim threshold": (-1, 512 << 20)}


def tune_malloc() -> str:
    """Set :data:`MALLOC_SETTINGS` with glibc's ``mallopt`` so that the arrays a train step makes
    afresh (outputs, loss gradients) reuse freed heap memory instead of page-faulting new memory
    in; return what was done, for ``mdnumba info``. Not on other C libraries, with
    ``MDNUMBA_MALLOC_TUNING=0``, or where ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
    or ``GLIBC_TUNABLES`` set these thresholds (glibc reads them when the process starts)."""
    if not env_flag("MDNUMBA_MALLOC_TUNING", True):
        return "off (MDNUMBA_MALLOC_TUNING=0)"
    if platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "mmap_threshold" in tunables or "trim_threshold" in tunables:
        return "off (the environment sets glibc's thresholds)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "off (mallopt not found)"
    done = [f"{name} {value >> 20} MiB" for name, (param, value) in MALLOC_SETTINGS.items()
            if mallopt(param, value) == 1]
    return ", ".join(done) or "off (mallopt refused)"


def host_vector_bytes() -> int:
    """Bytes per vector register of the host CPU for the register tiles: 64 with AVX-512F, else 32."""
    try:
        from llvmlite import binding
        return 64 if binding.get_host_cpu_features().get("avx512f", False) else 32
    except RuntimeError:  # features unknown
        return 32


#: CUDA sweep paths: auto (cooperative, falling back), cooperative, per-diagonal
CUDA_PATHS = ("auto", "cooperative", "per-diagonal")
#: CUDA sweep layouts: auto (per sweep), flat (items over the whole grid), sliced (a block per slice of
#: units), staged (sliced, the neighbours' rows read through shared-memory tiles), item (a block per
#: batch item, block barriers instead of grid syncs), tensor (the recurrent sums on tensor cores, 3xTF32)
CUDA_LAYOUTS = ("auto", "flat", "sliced", "staged", "item", "tensor")
#: sweep stages the timing diagnostic ``MDNUMBA_CUDA_SKIP`` can leave out
CUDA_SKIP_STAGES = ("sum", "cell")
#: ``MDNUMBA_VECTOR_BYTES`` settings: AVX2's 32, AVX-512's 64
VECTOR_CHOICES = ("32", "64")

try:
    FASTMATH: bool = env_flag("MDNUMBA_FASTMATH", False)
    #: the host CPU's vector bytes (:func:`host_vector_bytes`, asked once)
    HOST_VECTOR_BYTES: int = host_vector_bytes()
    #: bytes per vector of the CPU register tiles (:mod:`mdnumba.kernels.simd`): the host's
    #: unless ``MDNUMBA_VECTOR_BYTES`` says 32 or 64
    VECTOR_BYTES: int = int(env_choice("MDNUMBA_VECTOR_BYTES", str(HOST_VECTOR_BYTES), VECTOR_CHOICES))
    #: Numba's on-disk cache, keyed also on the kernel sources, FASTMATH and a VECTOR_BYTES that
    #: is not the host's (mdnumba.kernel_cache; the CPU itself is in Numba's key)
    _VARIANT = ("fastmath" if FASTMATH else "exact") + \
        ("" if VECTOR_BYTES == HOST_VECTOR_BYTES else f"-v{VECTOR_BYTES}")
    CACHE: bool = env_flag("MDNUMBA_CACHE", True) and kernel_cache.install(_VARIANT)
    THREADS_PER_BLOCK: int = env_int("MDNUMBA_THREADS_PER_BLOCK", 128)
    CUDA_ROWS_PER_THREAD: int = env_int("MDNUMBA_CUDA_ROWS_PER_THREAD", 2)
    CUDA_UNROLL: int = env_int("MDNUMBA_CUDA_UNROLL", 8)
    CUDA_PATH: str = env_choice("MDNUMBA_CUDA_PATH", "auto", CUDA_PATHS)
    CUDA_LAYOUT: str = env_choice("MDNUMBA_CUDA_LAYOUT", "auto", CUDA_LAYOUTS)
    CUDA_SLICE_UNITS: int = env_int("MDNUMBA_CUDA_SLICE_UNITS", 8)
    CUDA_ITEM_THREADS: int = env_int("MDNUMBA_CUDA_ITEM_THREADS", 512)
    CUDA_ITEM_ROWS: int = env_int("MDNUMBA_CUDA_ITEM_ROWS", 4)
    CUDA_TENSOR_TILES: int = env_int("MDNUMBA_CUDA_TENSOR_TILES", 2)
    CUDA_PREPARED_LAUNCH: bool = env_flag("MDNUMBA_CUDA_PREPARED_LAUNCH", True)
    #: diagnostic only: the stages of CUDA_SKIP_STAGES the CUDA sweeps skip (wrong results)
    CUDA_SKIP: tuple[str, ...] = env_subset("MDNUMBA_CUDA_SKIP", CUDA_SKIP_STAGES)
    #: blocks per SM the CUDA sweep kernels are compiled for (launch bounds; 0: none)
    CUDA_MIN_BLOCKS: int = env_int("MDNUMBA_CUDA_MIN_BLOCKS", 0)
    #: the CUDA sweeps run the cell math of N <= 3 dimensions on registers (wavefront_cuda)
    CUDA_CELL_REGISTERS: bool = env_flag("MDNUMBA_CUDA_CELL_REGISTERS", True)
    #: what :func:`tune_malloc` did at import
    MALLOC_TUNING: str = tune_malloc()
except ConfigError:
    _report_config_errors_briefly()
    raise

#: the LLVM fast-math flags of ``MDNUMBA_FASTMATH=1`` on the CPU: ``fastmath=True`` less "nnan"
#: and "ninf" (with them LLVM may assume no NaN/inf: the cell's tanh then turned the NaN of an
#: overflowed state into 1, and forward's check of h saw nothing) and less "reassoc" outside
#: sums of products (it regroups the exp's range reduction ``(x − t·ln2_hi) − t·ln2_lo``:
#: 213 ulp at x = 707 instead of 1.1)
FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn"})
#: keyword arguments shared by every serial CPU kernel
#: (error_model="numpy": float division by zero gives inf/NaN instead of raising, which lets
#: LLVM vectorise loops that divide, e.g. σ in the cell math)
NJIT_OPTS = dict(cache=CACHE, fastmath=set(FASTMATH_FLAGS) if FASTMATH else False, nogil=True,
                 error_model="numpy")
#: keyword arguments shared by every parallel CPU driver
NJIT_PARALLEL_OPTS = dict(NJIT_OPTS, parallel=True)
#: serial GEMM kernels whose sums are chains in a fixed order, ``o + a_0·b_0 + a_1·b_1 + …``:
#: "contract" alone fuses each term into one multiply-add (no reassociation), so a row's numbers
#: are the same in every kernel and group that computes them (:func:`~mdnumba.kernels.gemm.quad_product`)
NJIT_CHAIN_OPTS = dict(NJIT_OPTS, fastmath={"contract"} | (FASTMATH_FLAGS if FASTMATH else set()))

def resolve_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is float32/float64, else raise TypeError; None is the
    default, :data:`DEFAULT_DTYPE` (NumPy would read it as float64)."""
    dt = np.dtype(DEFAULT_DTYPE if dtype is None else dtype)
    if dt not in [np.dtype(d) for d in SUPPORTED_DTYPES]:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt
