"""Choosing the data path once per process, and numba's on-disk cache of the kernels.

The ciphers themselves are checked on both paths in test_xts.py and test_ciphers.py; here:
the numba path is what the registry hands out when numba works, the numpy path when numba
cannot be imported (checked in a fresh process that cannot import it), the cache lives in a
private directory of the user and a second process loads the kernels from it instead of
compiling them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbd_plugin.crypto import jit, vaes
from nbd_plugin.crypto.registry import make_cipher
from tests.support.nbd import ROOT

PROBE = """
import json, sys
{prelude}
from nbd_plugin.crypto import jit, vaes
from nbd_plugin.crypto.registry import make_cipher
c = make_cipher("aes", "xts-plain64", bytes(range(64)))
out = {{"path": jit.data_path(), "reason": jit.reason(), "cipher": c.data_path}}
if out["path"] == "numba":
    from nbd_plugin.crypto import kernels, vaes
    sets = [kernels.xts_kernel()]
    if vaes.unavailable() is None:
        sets.append(kernels.xts_vaes_kernel())
    loaded = [k for s in sets for k in s]
    hits = sum(sum(k.stats.cache_hits.values()) for k in loaded)
    misses = sum(sum(k.stats.cache_misses.values()) for k in loaded)
    signatures = sum(len(k.signatures) for k in loaded)
    out.update(hits=hits, misses=misses, signatures=signatures, cache=loaded[0].stats.cache_path)
print(json.dumps(out))
"""


def probe(cache_home: Path, prelude: str = "") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["XDG_CACHE_HOME"] = str(cache_home)
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(prelude=prelude)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    return result


def test_registry_hands_out_the_numba_path_here() -> None:
    assert jit.data_path() == "numba", jit.reason()
    for mode, key in (("xts-plain64", 64), ("cbc-essiv:sha256", 32), ("cbc-plain64", 16)):
        assert make_cipher("aes", mode, os.urandom(key)).data_path == "numba"


def test_without_numba_the_numpy_path_is_chosen(tmp_path: Path) -> None:
    got = probe(tmp_path, prelude="sys.modules['numba'] = None  # import numba fails")
    assert got["path"] == "numpy"
    assert got["cipher"] == "numpy"
    assert "numba is not importable" in str(got["reason"])


def test_a_second_process_loads_the_kernels_from_a_private_cache(tmp_path: Path) -> None:
    first = probe(tmp_path)
    assert first["path"] == "numba"
    cache = tmp_path / "vmshield" / "numba"
    assert str(first["cache"]).startswith(str(cache / jit.kernel_digest()))
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert ((cache / jit.kernel_digest()).stat().st_mode & 0o777) == 0o700
    assert any(cache.rglob("*.nbi")), "numba wrote no cache index"
    second = probe(tmp_path)
    # every signature of each kernel's three calls (and the VAES ones where they run), none
    # compiled
    assert second["signatures"] >= 5
    assert (second["hits"], second["misses"]) == (second["signatures"], 0)


def test_the_cache_directory_changes_with_any_file_the_kernels_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numba checks only the cached function's own file: a new vaes.py or layout.py with an
    unchanged kernels.py would run the old machine code from a shared directory."""
    here = Path(jit.__file__).parent
    copy = tmp_path / "crypto"
    copy.mkdir()
    for name in jit.KERNEL_SOURCES:
        (copy / name).write_bytes((here / name).read_bytes())
    monkeypatch.setattr(jit, "__file__", str(copy / "jit.py"))
    assert jit.kernel_digest() == (monkeypatch.undo() or jit.kernel_digest())
    monkeypatch.setattr(jit, "__file__", str(copy / "jit.py"))
    seen = {jit.kernel_digest()}
    for name in jit.KERNEL_SOURCES:
        with (copy / name).open("a") as f:
            f.write("\n# changed\n")
        seen.add(jit.kernel_digest())
    assert len(seen) == 1 + len(jit.KERNEL_SOURCES)


def test_kernels_compiled_before_the_cache_is_chosen_are_not_cached(tmp_path: Path) -> None:
    """Compiled straight from ``kernels`` (tests, benchmarks), before ``jit`` chose the digest
    directory: numba would cache next to kernels.py and later load that machine code after a
    change to vaes.py (it ran a stale kernel against changed IR here once)."""
    code = (
        "from nbd_plugin.crypto import kernels\n"
        "print([k.stats.cache_path for k in kernels.xts_kernel()])\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[None, None, None, None]"  # run, read, write, mapped
    assert not list((Path(ROOT) / "nbd_plugin" / "crypto").rglob("*.nbi"))


def test_a_cache_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "vmshield"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # mkdir's mode is cut by the umask
    got = probe(tmp_path)
    assert got["path"] == "numba"
    assert "compiled at start" in str(got["reason"])
    assert not (shared / "numba").exists()


def test_image_info_reports_the_data_path(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from keystore.cli import main
    from nbd_plugin import luks

    image = tmp_path / "d.img"
    luks.create_image(str(image), 1 << 20, b"pw", iterations=1000)
    r = CliRunner().invoke(main, ["image", "info", "--json", str(image)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["data_path"] == jit.data_path()


XTS = "vaes-xts" if vaes.unavailable() is None else "openssl-xts"
"""What an XTS image of a LUKS sector size runs on here."""


@pytest.mark.parametrize(
    ("fmt", "cipher", "opts", "kernel"),
    [
        ("luks2", "aes-xts-plain64", {"sector_size": 4096}, XTS),
        ("luks1", "aes-xts-plain64", {}, XTS),
        ("luks1", "aes-cbc-essiv:sha256", {}, "aes-ecb"),
    ],
)
def test_image_info_reports_the_kernel_of_the_image(
    tmp_path: Path, fmt: str, cipher: str, opts: dict[str, int], kernel: str
) -> None:
    from click.testing import CliRunner

    from keystore.cli import main
    from nbd_plugin import luks

    image = tmp_path / "d.img"
    key_bytes = 32 if "cbc" in cipher else 64
    luks.create_image(
        str(image), 1 << 20, b"pw", fmt=fmt, cipher=cipher, key_bytes=key_bytes,
        iterations=1000, **opts,
    )  # fmt: skip
    r = CliRunner().invoke(main, ["image", "info", "--json", str(image)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["kernel"] == kernel
    r = CliRunner().invoke(main, ["image", "info", str(image)])
    assert f"kernel:         {kernel}" in r.output


def serve_once(tmp_path: Path, *extra: str, until: str) -> str:
    """nbdkit -v with the plugin, one copy through it; its log once ``until`` is in it."""
    import tempfile
    import time

    from nbd_plugin import luks
    from tests.support.nbd import PLUGIN, write_secret

    tmp_path.mkdir()
    image, key, log = tmp_path / "s.img", tmp_path / "key", tmp_path / "log"
    write_secret(key, b"pw")
    luks.create_image(str(image), 1 << 20, b"pw", iterations=1000)
    sock = Path(tempfile.mkdtemp(dir="/tmp", prefix="vmj")) / "s.sock"
    argv = ["nbdkit", "-f", "-v", "-U", str(sock), "python", PLUGIN, f"image={image}"]
    with log.open("wb") as err:
        proc = subprocess.Popen([*argv, f"passphrase=+{key}", *extra], stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"], check=True)
        while until not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()
    return log.read_text(errors="replace")


def test_the_plugin_logs_its_data_path_and_thread_model(tmp_path: Path) -> None:
    log = serve_once(tmp_path / "auto", until="ready in")  # logged once the kernels load
    assert "vmshield: data path numba (loading at start)" in log
    assert "using thread model: serialize_requests" in log
    assert "vmshield: data path numba 0." in log
    assert f"kernel {XTS} (512-byte sectors)" in log
    log = serve_once(tmp_path / "numpy", "data_path=numpy", until="vmshield: data path numpy")
    assert "vmshield: data path numpy" in log
    assert "using thread model: serialize_all_requests" in log


def test_cache_dir_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_dir() == str(tmp_path / "xdg" / "vmshield" / "numba")
    service = tmp_path / "systemd"
    service.mkdir(mode=0o755)
    monkeypatch.setenv("CACHE_DIRECTORY", str(service))  # systemd's CacheDirectory=
    assert jit.cache_dir() == str(service / "numba")
    assert (service / "numba").stat().st_mode & 0o777 == 0o700
    service.chmod(0o777)  # a service cache others can write is not used; XDG's then is
    assert jit.cache_dir() == str(tmp_path / "xdg" / "vmshield" / "numba")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, like ~ unset
    monkeypatch.setenv("HOME", "relative")
    monkeypatch.delenv("CACHE_DIRECTORY")
    assert jit.cache_dir() is None


def test_a_cache_below_a_directory_another_user_owns_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root with another user's HOME (sudo -E): ~/.cache is theirs, so the private vmshield/numba
    made in it can be renamed away after the check and replaced by theirs, with their machine
    code; a cache whose ancestors someone else controls is never used."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the attack is root using a directory another user owns")
    theirs = tmp_path / "home-of-another-user" / ".cache"
    theirs.mkdir(parents=True, mode=0o755)
    os.chown(theirs, 65534, 65534)  # nobody's ~/.cache
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(theirs))
    assert jit.cache_dir() is None
    assert not (theirs / "vmshield").exists()
    service = theirs / "svc"  # systemd's CacheDirectory= is checked the same way
    service.mkdir(mode=0o700)
    monkeypatch.setenv("CACHE_DIRECTORY", str(service))
    assert jit.cache_dir() is None
    link = tmp_path / "link"  # a symlink to it does not hide whose the directory is
    link.symlink_to(theirs)
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(link))
    assert jit.cache_dir() is None
