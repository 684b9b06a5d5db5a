import os
import signal

import numpy as np
import pytest
import simruns
from shard import parse_shard


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _no_compile_notice(monkeypatch):
    """The CLI's "compiling the kernels" notice comes where a command compiles a kernel, which
    depends on what this process and the kernel cache hold already: no test sees it unless it
    asks for it (test_cli.py)."""
    try:
        from mdnumba.cli import main
    except ImportError:  # not installed (PYTHONPATH=.): no CLI to silence
        return
    monkeypatch.setattr(main, "_say_compiling", lambda: None)


@pytest.fixture(scope="session", autouse=True)
def _signals_as_in_a_terminal():
    """The tests send real SIGINTs (Ctrl-C) and SIGTERMs, also in the simulator subprocesses:
    give the session Python's handlers also where it inherits them ignored (a shell script's
    background job ignores SIGINT), which a run respects."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {sig: signal.getsignal(sig) for sig in defaults}
    for sig, handler in defaults.items():
        if before[sig] is signal.SIG_IGN:
            signal.signal(sig, handler)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session", autouse=True)
def simulator_runs(request, tmp_path_factory):
    """The simulator runs tests/test_cuda.py's selected tests need and the background runs of
    the selected ``@pytest.mark.background`` tests (tests/simruns.py), started with the session
    so that they overlap it; stopped at its end."""
    runs = simruns.start(request.session.items, tmp_path_factory)
    yield runs
    simruns.stop(runs)


@pytest.fixture
def background_run(request, simulator_runs, tmp_path_factory) -> simruns.Background:
    """This ``@pytest.mark.background`` test's subprocess, started with the session (or now,
    where the session started none: under the simulator)."""
    run = simulator_runs.get(request.node.nodeid)
    return run if run is not None else simruns.start_background(request.node, tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    """The tests that wait for the simulator or background runs go last. ``MDNUMBA_TEST_SHARD=i/k``: keep
    every k-th collected test from the i-th on (0 <= i < k). tests/test_cuda.py splits its
    simulator case run into concurrent shards this way; round robin spreads a heavy test's
    parametrisations over the shards. Then the cases a case run before this one did are left out
    (:func:`simruns.leave_out_done`)."""
    simruns.waiting_last(items)
    shard = os.environ.get("MDNUMBA_TEST_SHARD")
    if shard:
        try:
            i, k = parse_shard(shard)
        except ValueError as exc:
            raise pytest.UsageError(f"MDNUMBA_TEST_SHARD: {exc}") from None
        config.hook.pytest_deselected(items=[it for n, it in enumerate(items) if n % k != i])
        items[:] = items[i::k]
    simruns.leave_out_done(config, items)  # after the shard's pick: a restarted shard keeps its cases


_CASE_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A case run watching the CUDA context (``MDNUMBA_CASES_LOST``, tests/simruns.py CaseRun)
    stops after a case that failed and left it unusable (a sticky error: every later case of the
    process would fail too), naming the case in that file; its runner goes on in a fresh process.
    Checked after the case's teardown (its monkeypatches undone)."""
    outcome = yield
    lost = os.environ.get(simruns.CASES_LOST)
    if not lost:
        return
    failed = item.stash[_CASE_FAILED] = item.stash.get(_CASE_FAILED, False) or outcome.get_result().failed
    if call.when == "teardown" and failed and not simruns.cuda_context_alive():
        with open(lost, "w") as f:
            f.write(item.name)
        item.session.shouldstop = f"the CUDA context was lost in {item.name}"
