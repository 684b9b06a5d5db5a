"""Runs a GPU benchmark script's simulated launches under tests/simgrid.py.

The tests that run ``bench/`` scripts under the CUDA simulator (``tests/test_bench_smoke.py``)
put this folder and ``tests/`` first on ``PYTHONPATH``: Python imports this module at start-up,
and in a process that runs a script of ``bench/`` with ``NUMBA_ENABLE_CUDASIM=1`` it installs
:func:`simgrid.install` for the whole process. numba-cuda's own simulator has its launching
thread poll every thread of a block in a loop while they run: it holds the GIL, so each thread
waits up to a switch interval (5 ms) at every barrier, and a tensor-layout train step at 4x4 B1
D2 (64 threads meeting at every mma) took 15 to over 100 s instead of ~4; simgrid's threads
meet at barriers without a poller, and it checks the scripts' launches for races and divergent
barriers as it does the simulator cases'. Cooperative grids keep numba's single block
(``coop_blocks=1``), so the scripts take the paths they take under numba's simulator. Processes
that run anything else (the GPU test cases ``run_gpu.sh`` starts, which install it themselves)
are left alone.
"""

import os
import sys

_script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
if (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        and os.path.basename(os.path.dirname(_script)) == "bench" and _script.endswith(".py")):
    import simgrid

    #: the installed patches, kept for the process's life (a collected generator would undo them)
    INSTALLED = simgrid.install(coop_blocks=1)
    INSTALLED.__enter__()
    # what the smoke test looks for: a run_gpu.sh that dropped PYTHONPATH would lose this module
    print(f"{os.path.basename(_script)}: launches under tests/simgrid.py", file=sys.stderr, flush=True)
