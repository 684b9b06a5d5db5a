"""Numba's on-disk kernel cache, told what it cannot see by itself.

Numba keys a cached function on its own source file (a hash of the text) and its bytecode,
not on the code it inlines from other files, nor on its compile options. Two ways that went
wrong here: after an edit of ``kernels/cell.py`` (inlined into the sweeps of ``wavefront.py``
and ``gridlstm.py``) the sweeps kept running the old cell code from the cache, and a kernel
cached without ``MDNUMBA_FASTMATH`` was reused with it, and the other way round.

:class:`KernelCacheLocator` wraps the locator Numba would pick for mdnumba's files (in-tree
``__pycache__``, ``NUMBA_CACHE_DIR`` or the user-wide one): its freshness stamp adds a digest
of every kernel source (``mdnumba/kernels/*.py`` and ``config.py``), so an edit of any of them
recompiles every cached kernel, and each fastmath setting caches into its own sub-folder.
In those folders Numba's index writes are locked (:func:`_locked_save`), so that processes
compiling the same kernels at once (two first runs, the test suite's warm-up) keep every entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from numba.core import caching as _caching

try:
    import fcntl
except ImportError:  # Windows: no index lock
    fcntl = None

# Numba internals (CacheImpl is _CacheImpl in older releases); without them mdnumba does not cache
_CacheImpl = getattr(_caching, "CacheImpl", getattr(_caching, "_CacheImpl", None))
_CacheLocator = getattr(_caching, "_CacheLocator", None)

_PACKAGE = Path(__file__).resolve().parent


def sources_digest() -> str:
    """SHA-256 over the names and bytes of the kernel sources (what cached kernels inline)."""
    h = hashlib.sha256()
    for path in sorted((_PACKAGE / "kernels").glob("*.py")) + [_PACKAGE / "config.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


class KernelCacheLocator(_CacheLocator or object):
    """Numba's own locator for the file, with the sources digest added to its stamp and the
    compile-option variant to its path; only for files of the mdnumba package."""

    variant = "default"
    digest = ""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        """Anything else from Numba's locator (e.g. ``_py_file``, which Numba reads to warn that
        a kernel cannot be cached)."""
        if name == "_inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    @classmethod
    def from_function(cls, py_func, py_file):
        if not Path(py_file).resolve().is_relative_to(_PACKAGE):
            return None
        for other in _CacheImpl._locator_classes:
            inner = None if other is cls else other.from_function(py_func, py_file)
            if inner is not None:
                self = cls(inner)
                try:
                    self.ensure_cache_path()
                except OSError:
                    return None
                return self
        return None

    def get_cache_path(self):
        path = os.path.join(self._inner.get_cache_path(), self.variant)
        _OUR_FOLDERS.add(path)
        return path

    def get_source_stamp(self):
        return self._inner.get_source_stamp(), self.digest

    def get_disambiguator(self):
        return self._inner.get_disambiguator()


#: the cache folders of mdnumba's kernels (their index writes are locked: :func:`_locked_save`)
_OUR_FOLDERS: set = set()


def _locked_save(save):
    """Numba's ``IndexDataCacheFile.save`` under an exclusive lock (``<index>.nbi.lock``) in
    mdnumba's folders. Numba reads a function's index, adds the new specialisation and writes
    the index back, unlocked: two processes compiling the same kernel at once (two first runs,
    the test suite's warm-up) could each write back an index without the other's entry, or
    both name their data file 1, leaving one's index pointing at the other's code."""
    @functools.wraps(save)
    def locked_save(self, key, data):
        if fcntl is None or getattr(self, "_cache_path", None) not in _OUR_FOLDERS:
            return save(self, key, data)
        with open(self._index_path + ".lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return save(self, key, data)  # unlocked as the file closes
    locked_save.mdnumba_locked = True
    return locked_save


#: why :func:`install` left the cache off (for ``mdnumba info``)
OFF_BECAUSE = "MDNUMBA_CACHE=0"


def install(variant: str) -> bool:
    """Put :class:`KernelCacheLocator` first among Numba's cache locators, caching into the
    sub-folder ``variant`` (one per compile-option set). False, with a warning, when this
    Numba's cache internals differ from the ones it was written for, or when no cache folder is
    writable (a read-only install without a writable home): then do not cache."""
    global OFF_BECAUSE
    if not isinstance(getattr(_CacheImpl, "_locator_classes", None), list) or _CacheLocator is None:
        OFF_BECAUSE = "unknown Numba cache internals"
        warnings.warn("mdnumba: unknown Numba cache internals; kernels are compiled in every process",
                      stacklevel=2)
        return False
    KernelCacheLocator.variant, KernelCacheLocator.digest = variant, sources_digest()
    if KernelCacheLocator.from_function(install, str(_PACKAGE / "kernels" / "wavefront.py")) is None:
        # Numba would refuse every cache=True kernel at import ("no locator available")
        OFF_BECAUSE = "no writable cache folder; set NUMBA_CACHE_DIR"
        warnings.warn("mdnumba: no writable folder for the kernel cache (the package's folder and Numba's "
                      "user-wide one are read-only); kernels are compiled in every process: set "
                      "NUMBA_CACHE_DIR to a writable folder to cache them (MDNUMBA_CACHE=0: no cache, "
                      "no warning)", stacklevel=2)
        return False
    if KernelCacheLocator not in _CacheImpl._locator_classes:
        _CacheImpl._locator_classes.insert(0, KernelCacheLocator)
    index_file = getattr(_caching, "IndexDataCacheFile", None)
    if index_file is not None and not getattr(index_file.save, "mdnumba_locked", False):
        index_file.save = _locked_save(index_file.save)
    return True


def _sweep_locator() -> KernelCacheLocator | None:
    """The cache locator of ``kernels/wavefront.py``'s forward sweep (None: no writable folder)."""
    from .kernels import wavefront
    return KernelCacheLocator.from_function(wavefront._sweep_forward.py_func, wavefront.__file__)


def _is_ours(dispatcher: object) -> bool:
    """Whether a Numba dispatcher compiles one of mdnumba's kernels."""
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
    return module == "mdnumba" or module.startswith("mdnumba.")


class FirstCompile:
    """Calls ``say()`` as this process starts compiling its first kernel of mdnumba's while
    :meth:`watching` (Numba's ``numba:compile`` event, which a load from the kernel cache does not
    raise), once, however many compiles follow: a command's "compiling the kernels" notice.
    numba-cuda raises no such event for its kernels."""

    def __init__(self, say: Callable[[], None]):
        self.say, self.said = say, False

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        from numba.core import event
        owner = self

        class Listener(event.Listener):
            def on_start(self, ev):
                if not owner.said and _is_ours(ev.data.get("dispatcher")):
                    owner.said = True
                    owner.say()

            def on_end(self, ev):
                pass

        with event.install_listener("numba:compile", Listener()):
            yield


def describe() -> str:
    """Where the kernels of ``kernels/wavefront.py`` are cached, the variant and the digest."""
    locator = _sweep_locator()
    if locator is None:
        return "no writable cache folder: kernels are compiled in every process"
    return f"{locator.get_cache_path()} (sources {KernelCacheLocator.digest[:12]})"
