"""Whether this process runs the numba data path, decided once, and where numba's cache lives.

The data path is "numba" (``nbd_plugin.crypto.kernels``: one compiled, GIL-free call per
request) when numba imports, libcrypto is there and the kernels compile; else "numpy" (the
vectorised numpy/cryptography path of ``xts.py``, and ``cbc.py``'s own). ``select`` may force
either before the first cipher is made (the plugin's ``data_path=`` parameter).

Importing numba and loading the kernels costs ~0.3 s of CPU (more on a loaded machine), so a
server calls ``defer``, then ``start_loading``, and does not wait: ciphers made meanwhile
(``jit_cipher.jitted``) start on the numpy path and switch to the kernels when they are
loaded. ``expected()`` tells the thread model before that.

Compiled kernels are cached on disk so that a server's start does not wait for LLVM (~0.5 s
per kernel): numba's default would be ``__pycache__`` next to the code, which is read-only in
a packaged install, so the cache goes to a private directory of this user
(``$XDG_CACHE_HOME/vmshield/numba`` or ``~/.cache/vmshield/numba``, mode 0700), in a
subdirectory named after the kernels' sources (``kernel_digest``). Numba runs
the machine code it finds there, so a directory that another user could write to is never
used: then the kernels are compiled in memory at start instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from nbd_plugin.crypto.libcrypto import update_address
from nbd_plugin.errors import UnsupportedError
from nbd_plugin.trust import Untrusted, private_dir, trusted_path

PATHS = ("numba", "numpy")
CACHE_ENV = "NUMBA_CACHE_DIR"

_lock = threading.Lock()  # guards the state below; held only briefly
_load_lock = threading.Lock()  # one loader at a time; held while numba imports
_forced: str | None = None
_state: tuple[ModuleType | None, str] | None = None  # (kernels module, why not numba)
_loading = False  # deferred: a loading thread decides (or will)
_thread: threading.Thread | None = None
_when_decided: list[Callable[[], None]] = []


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a real directory that only root or we can change (nbd_plugin.trust)."""
    try:
        private_dir(Path(path), "numba cache", mode=None)
    except (Untrusted, OSError):
        return False
    return True


def cache_dir() -> str | None:
    """This user's private numba cache directory, made if needed; None if there is none.

    Under systemd with ``CacheDirectory=`` (the unit's home is hidden by ProtectHome), the
    directory systemd made for the service; else ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    systemd = (os.environ.get("CACHE_DIRECTORY") or "").split(":")[0]
    if os.path.isabs(systemd) and _private_dir(systemd):
        return _private_subdirs(systemd, ("numba",))
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return _private_subdirs(base, ("vmshield", "numba"))


def _private_subdirs(base: str, parts: tuple[str, ...]) -> str | None:
    """base/parts..., each made 0700 if missing and refused unless private; None if not."""
    trusted = trusted_path(base)
    if trusted is None:
        return None
    path = trusted
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            return None
        if not _private_dir(path):
            return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


KERNEL_SOURCES = ("kernels.py", "layout.py", "vaes.py")
"""The files whose code or constants the compiled kernels hold. Numba's cache notices a change
of the cached function's own file only, so its directory is named after a digest of all."""


def kernel_digest() -> str:
    """16 hex digits of SHA-256 over ``KERNEL_SOURCES`` (the cache subdirectory's name)."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()[:16]


def select(path: str | None) -> None:
    """Force "numba" or "numpy" (None: numba when it works). Only before the first cipher."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"data path must be one of {', '.join(PATHS)}")
    with _lock:
        if (_state is not None or _loading) and path != _forced:
            raise RuntimeError("the data path is chosen once, before the first cipher")
        _forced = path


def _load() -> tuple[ModuleType | None, str]:
    if _forced == "numpy":
        return None, "data_path=numpy was asked for"
    cache = cache_dir()
    if cache is not None:
        cache = _private_subdirs(cache, (kernel_digest(),))
    if cache is not None:
        os.environ[CACHE_ENV] = cache  # read by numba when it is first imported
    try:
        import numba
    except ImportError as exc:
        return None, f"numba is not importable ({exc})"
    config: Any = numba.config
    config.CACHE_DIR = cache or ""  # in case numba was imported before us
    if update_address() is None:
        return None, "the system libcrypto was not found"
    try:
        from nbd_plugin.crypto import kernels

        kernels.set_cache(cache is not None)
        kernels.xts_kernel()
        kernels.xts_sectors_kernel()
    except Exception as exc:  # numba or LLVM failing is a reason to fall back, not to stop
        return None, f"the numba kernels did not compile ({type(exc).__name__}: {exc})"
    from nbd_plugin.crypto import vaes

    if vaes.unavailable() is None:
        try:
            kernels.xts_vaes_kernel()
        except Exception as exc:  # the other kernels still serve XTS
            vaes.refuse(f"the VAES kernel did not compile ({type(exc).__name__}: {exc})")
    where = f"cache {cache}" if cache else "no private cache directory: compiled at start"
    return kernels, f"numba {numba.__version__} ({where})"


def _decide() -> None:
    """Load (once) and run whatever waited for the decision."""
    global _state, _loading
    with _load_lock:
        with _lock:
            if _state is not None:
                return
        started = time.monotonic()
        state = _load()
        state = (state[0], f"{state[1]}, ready in {time.monotonic() - started:.2f} s")
        with _lock:
            _state, _loading = state, False
            waiting = list(_when_decided)
            _when_decided.clear()
    for callback in waiting:
        callback()


def defer() -> None:
    """Ciphers made from now on start on the numpy path; ``start_loading`` (or the first
    ``kernels()`` call) decides. A forced data_path=numba is not deferred: it fails early."""
    global _loading
    with _lock:
        if _state is None and _forced != "numba":
            _loading = True


def start_loading() -> None:
    """Decide on a thread, after a deferral. A server calls it once it has forked (nbdkit's
    after_fork): a thread started before fork() would not exist in the serving process."""
    global _thread
    with _lock:
        if not _loading or _thread is not None:
            return
        _thread = threading.Thread(target=_decide, name="vmshield-jit", daemon=True)
    _thread.start()


def status() -> str:
    """ "numba" or "numpy" once decided, "loading" while deferred, else "undecided"."""
    with _lock:
        if _state is not None:
            return "numba" if _state[0] is not None else "numpy"
        return "loading" if _loading else "undecided"


def when_decided(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the path is decided (now, or on the loading thread)."""
    with _lock:
        if _state is None:
            _when_decided.append(callback)
            return
    callback()


def expected() -> str:
    """The path this process will use, without waiting for numba to load: for decisions that
    cannot wait (nbdkit's thread model)."""
    with _lock:
        if _state is not None:
            return "numba" if _state[0] is not None else "numpy"
        forced = _forced
    if forced is not None:
        return forced
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def kernels() -> ModuleType | None:
    """The compiled kernels module, or None on the numpy path (waits for the decision)."""
    _decide()
    with _lock:
        assert _state is not None
        if _forced == "numba" and _state[0] is None:
            raise UnsupportedError(f"data_path=numba: {_state[1]}")
        return _state[0]


def demote(why: str) -> None:
    """Use the numpy path from now on (a kernel failed its self-check)."""
    global _state
    with _lock:
        _state = (None, why)


def data_path() -> str:
    """ "numba" or "numpy": what the ciphers of this process use (waits for the decision)."""
    return "numba" if kernels() is not None else "numpy"


def reason() -> str:
    """One line for the debug log: the data path and, on the numpy path, why."""
    kernels()
    return describe()


def describe() -> str:
    """``reason()`` without waiting or raising ("loading" before the decision)."""
    with _lock:
        if _state is None:
            return "loading" if _loading else "undecided"
        return _state[1] if _state[0] is not None else f"numpy: {_state[1]}"
