"""nbdkit Python plugin: serve the plaintext of a LUKS image.

    nbdkit -U SOCK python nbd_plugin/plugin.py image=disk.img passphrase=+keyfile

Parameters (nbdkit's Python plugin cannot show them in --help):

    image=PATH        (required) LUKS1/LUKS2 image file or block device.
    passphrase=+FILE  read the passphrase from FILE, byte for byte
    passphrase=-FD    read it from inherited file descriptor FD
    passphrase=-      prompt on the terminal
    passphrase=TEXT   literal passphrase (visible in ps and nbdkit -v: tests only)
    keyslot=N         try only LUKS2 keyslot N (what a clevis token's passphrase opens:
                      no other keyslot's KDF runs)
    discard=ignore|unmap
                      unmap: trim may punch holes (leaks which sectors are in use);
                      ignore (default): never unmap. A zero always writes encrypted
                      zeros (a hole reads as zeros through vmshield only).
    data_path=auto|numba|numpy
                      how requests are en/decrypted: numba (one compiled call per request,
                      requests in parallel), numpy (the fallback), auto (default: numba when
                      it imports and compiles). nbdkit -v logs the path in use and why.
    bind=UUID         only the QEMU of VM UUID may connect: in open() the client's pid
                      (nbdkit_peer_pid) must be a process whose -uuid is UUID; any other
                      client is refused with EACCES and one log line
                      (nbd_plugin/serve/peers.py, docs/hardening.md)
    bind_domain=NAME  with bind=: a client in a libvirt machine scope must be in domain
                      NAME's (the libvirt hook sets both)
    fence=-FD         the read end of the lease holder's pipe (vmshield disk serve on a
                      PostgreSQL keystore): once it closes, every request fails with EIO
                      and nbdkit shuts down (nbd_plugin/serve/fence.py).
    stats=PATH        publish the bytes clients read and write to PATH (JSON, replaced
                      atomically, at most once per second: nbd_plugin/serve/stats.py);
                      `vmshield disk serve` puts it beside the socket for `vmshield status`

Host mode, one server for every disk of the host (each disk an NBD export named after it):

    nbdkit -U /run/vmshield/nbd.sock python nbd_plugin/plugin.py \
        control=/run/vmshield/nbd-control.sock

    control=PATH      create the control socket PATH; disks are added and removed over it
                      at run time (nbd_plugin/serve/control.py, hostserver.py); no image=
                      nor any other per-disk parameter. data_path= applies to all disks.

This file only adapts nbdkit's callbacks to ``nbd_plugin.serve.disk`` (each connection's handle
is a ``Channel`` to the ``EncryptedDisk``); the logic lives in importable modules that tests
drive without nbdkit.
"""

import errno
import functools
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VENV_SITE = os.path.join(
    _REPO, ".venv", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"
)
for _path in (_REPO, _VENV_SITE):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

import nbdkit  # noqa: E402

from nbd_plugin.crypto.jit import defer as defer_kernels  # noqa: E402
from nbd_plugin.crypto.jit import describe as describe_path  # noqa: E402
from nbd_plugin.crypto.jit import expected as expected_path  # noqa: E402
from nbd_plugin.crypto.jit import start_loading, when_decided  # noqa: E402
from nbd_plugin.errors import Fenced, InvalidPassphrase, VmshieldError  # noqa: E402
from nbd_plugin.serve.config import ServerConfig, nbdkit_readonly  # noqa: E402
from nbd_plugin.serve.connlog import ConnectionLog  # noqa: E402
from nbd_plugin.serve.disk import NotFast, prepare_mapped_reads  # noqa: E402
from nbd_plugin.serve.exports import ExportRefused  # noqa: E402
from nbd_plugin.serve.hardening import harden_process, lock_all_memory  # noqa: E402
from nbd_plugin.serve.hostserver import HostServer  # noqa: E402
from nbd_plugin.serve.peers import PeerRefused, nbdkit_peer, read_peer  # noqa: E402
from nbd_plugin.serve.stats import IoStats, Publisher  # noqa: E402
from nbd_plugin.serve.threadstate import ThreadStates  # noqa: E402

API_VERSION = 2

# Before any passphrase is read: no core dump, no ptrace by the server's own user.
for _problem in harden_process():
    print(f"nbdkit: vmshield: warning: {_problem}", file=sys.stderr, flush=True)

_config = ServerConfig()
_connections = ConnectionLog()
_disk = None
_binding = None
_host = None  # host mode (control=): the exports and the control socket
_stats = IoStats()
_publisher = None
_threads = ThreadStates()  # a Python thread state per connection, not per request


def _fail(message):
    """Report a startup error in one line and stop nbdkit (no traceback, no secrets).

    Only called before nbdkit listens (config, config_complete), when nothing is open that
    needs cleaning up, so leaving at once with status 1 is safe.
    """
    print(f"nbdkit: vmshield: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def config(key, value):
    try:
        _config.set(key, value)
    except VmshieldError as exc:
        _fail(str(exc))


def config_complete():
    global _disk, _binding, _host
    if _config.host_mode:
        _connections.keep()
        try:
            _config.check_host_mode()
            _host = HostServer(_config.control, readonly=nbdkit_readonly(), log=_log)
            _host.before_fork()
        except VmshieldError as exc:
            _fail(str(exc))
        defer_kernels()
        nbdkit.debug(f"vmshield: host mode, control socket {_config.control}")
        return
    try:
        _binding = _config.binding()
        _disk = _config.open_disk(readonly=nbdkit_readonly())
    except InvalidPassphrase as exc:
        _fail(f"{_config.image}: {exc}")
    except (VmshieldError, ValueError) as exc:
        _fail(str(exc))
    _connections.keep()  # nbdkit sends stderr to /dev/null when it forks
    nbdkit.debug(f"vmshield: data path {expected_path()} ({describe_path()} at start)")
    cipher = _disk.volume.cipher  # switched to the kernels before this runs (registered first)
    when_decided(
        lambda: nbdkit.debug(
            f"vmshield: data path {describe_path()}; kernel {cipher.kernel_name} "
            f"({_disk.sector}-byte sectors)"
        )
    )


def after_fork():
    # In the serving process (nbdkit forks unless -f; mlock does not survive the fork): keep
    # every page holding the master key out of swap, then load the numba kernels on a thread.
    global _publisher
    problem = lock_all_memory()
    if problem is not None:
        print(
            f"nbdkit: vmshield: warning: memory not locked: {problem}, so the master key may "
            "be swapped out; run the server as root or from the systemd unit (MemorySwapMax=0)",
            file=sys.stderr,
            flush=True,
        )
    start_loading()
    prepare_mapped_reads()
    if _host is not None:
        _host.after_fork()
    if _config.stats is not None:
        _publisher = Publisher(_stats, _config.stats)
        _publisher.start()


def thread_model():
    # One request at a time per connection, connections (VMs, disks of the host server) in
    # parallel. PARALLEL let one connection's 16 threads fight over the GIL for the few
    # microseconds of Python each request runs: 3.3x slower at 4 KiB, 1.2-1.8x at 64 KiB, a
    # draw at 1 MiB with nbdcopy (issue 25, docs/performance.md "Thread model"). The numpy
    # path holds the GIL for most of a request; there one request at a time in all measured best.
    # A connection's Channel (serve/disk.py) relies on this: its context set serves one
    # request at a time (tests/disk/test_xts_jit.py checks the model nbdkit logs).
    if expected_path() == "numba":
        return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def list_exports(readonly, is_tls):
    if _host is None:
        return [""]  # what nbdkit lists without this callback: the default export
    return _host.exports.names(read_peer(nbdkit_peer()))  # only what this client may open


def open(readonly):
    if _host is not None:
        try:
            handle = _host.exports.open(nbdkit.export_name(), read_peer(nbdkit_peer()))
        except ExportRefused:
            nbdkit.set_error(errno.EACCES)
            raise
        _threads.keep()
        return handle
    if _binding is not None:
        try:
            _binding.check(read_peer(nbdkit_peer()))
        except PeerRefused as exc:
            _log(_connections.refused(str(exc)))
            nbdkit.set_error(errno.EACCES)
            raise
    channel = _disk.channel()  # its own context set: one frame per request; first, as
    # nothing below may be left half done if it fails (nbdkit then calls no close())
    _log(_connections.connected(readonly or _disk.volume.readonly))
    # nbdkit runs this connection's requests and close() on this thread (the serialized
    # thread models): its Python thread state now lives until close(), not one request
    _threads.keep()
    return channel


def close(h):
    _threads.drop()
    if _host is not None:
        _host.exports.close(h)
        return
    # the handle is a channel to the one shared disk, which closes in cleanup()
    _log(_connections.disconnected())


def _log(line):
    _connections.write(line)


def get_size(h):
    return h.size


def block_size(h):
    preferred = max(4096, h.sector)
    return (1, preferred, 0xFFFFFFFF)


def is_rotational(h):
    return False


def can_write(h):
    return not h.volume.readonly


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # All connections share one descriptor: a flush (fdatasync) on any connection covers
    # every write completed before it on every connection, so multi-conn is safe.
    return True


def can_trim(h):
    return h.can_trim


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def _fenced():
    """Refuse the request if the lease is gone (and shut nbdkit down, once)."""
    if _config.fence is None:
        return
    first = not _config.fence.fenced
    try:
        _config.fence.check()
    except Fenced as exc:
        if first:
            nbdkit.debug(f"vmshield: {exc}; shutting down")
            print(f"nbdkit: vmshield: error: {exc}; shutting down", file=sys.stderr, flush=True)
            nbdkit.shutdown()
        nbdkit.set_error(errno.EIO)
        raise


def _io_error(exc):
    if isinstance(exc, NotFast):
        nbdkit.set_error(errno.ENOTSUP)
    elif isinstance(exc, ValueError):
        nbdkit.set_error(errno.EINVAL)
    elif isinstance(exc, OSError) and exc.errno:
        nbdkit.set_error(exc.errno)
    else:
        nbdkit.set_error(errno.EIO)


def _request(callback, fenced=True):
    """An I/O callback that first refuses if fenced (unless `fenced` is false) and gives
    nbdkit the errno of what it raises."""

    @functools.wraps(callback)
    def guarded(*args):
        if fenced:
            _fenced()
        try:
            return callback(*args)
        except Exception as exc:
            _io_error(exc)
            raise

    return guarded


# pread and pwrite are written out rather than wrapped by _request: a 4 KiB request costs a
# few microseconds of Python in all, and the wrapper's frame was ~0.3 of them (issue 25).
def pread(h, buf, offset, flags):
    if _config.fence is not None:
        _fenced()
    try:
        h.pread(buf, offset)
    except Exception as exc:
        _io_error(exc)
        raise
    if _publisher is not None:  # counted only where published (stats=)
        _stats.add_read(len(buf))


def pwrite(h, buf, offset, flags):
    if _config.fence is not None:
        _fenced()
    try:
        h.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _io_error(exc)
        raise
    if _publisher is not None:
        _stats.add_written(len(buf))


@_request
def flush(h, flags):
    h.flush()


@_request
def trim(h, count, offset, flags):
    h.trim(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))


@_request
def zero(h, count, offset, flags):
    h.zero(
        offset,
        count,
        may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
        fua=bool(flags & nbdkit.FLAG_FUA),
        fast=bool(flags & nbdkit.FLAG_FAST_ZERO),
    )


@functools.partial(_request, fenced=False)
def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(off, n, 0 if is_data else hole) for off, n, is_data in h.extents(offset, count)]


def cleanup():
    if _host is not None:
        _host.cleanup()
    if _publisher is not None:
        _publisher.stop()  # the final counts
    if _disk is not None:
        _disk.close()
