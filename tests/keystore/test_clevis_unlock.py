"""Network-bound unlock with real parts: Debian's tangd (behind socat on loopback), clevis,
clevis-luks and cryptsetup, against vmshield's images, `disk serve --unattended` and the hook.

Interop both ways: what `clevis luks bind` wrote, vmshield opens; what `vmshield disk bind`
wrote, `clevis luks list|pass` read and cryptsetup accepts for that keyslot.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore.services.libvirt_hook import main as hook_main
from tests.keystore.test_libvirt_hook import domain
from tests.support.libvirt import Keystore, hook_keystore, processes
from tests.support.nbd import read_at, write_at
from tests.support.tang import Tang, tang_server

MARKER = b"network-bound marker \x00\xff" * 100


@pytest.fixture
def ks() -> Iterator[Keystore]:
    with hook_keystore("vcl") as k:
        yield k


@pytest.fixture
def tang(ks: Keystore) -> Iterator[Tang]:
    with tang_server(ks.base / "tang") as t:
        yield t


def image(ks: Keystore) -> str:
    disks = json.loads(ks.cli("disk", "list", "--json").stdout)
    return str(disks[0]["path"])


def sock(ks: Keystore) -> Path:
    return ks.base / "s.sock"


def write_marker(ks: Keystore) -> None:
    """The owner writes MARKER at 1 MiB through a served disk."""
    ks.cli("disk", "serve", ks.disk, "--socket", str(sock(ks)), "--password-file", str(ks.pwfile))
    write_at(str(sock(ks)), MARKER, 1 << 20)
    ks.cli("disk", "stop", ks.disk)


def serve_unattended(ks: Keystore, code: int = 0) -> subprocess.CompletedProcess[str]:
    return ks.cli("disk", "serve", ks.disk, "--unattended", "--socket", str(sock(ks)),
                  "--host-key", str(ks.host_key), code=code)  # fmt: skip


def clevis_bind(ks: Keystore, tang: Tang) -> None:
    cfg = json.dumps({"url": tang.url})
    subprocess.run(["clevis", "luks", "bind", "-y", "-d", image(ks), "-k", str(ks.pwfile),
                    "tang", cfg], check=True, capture_output=True, timeout=60)  # fmt: skip


def token(ks: Keystore, tk_id: int = 0) -> dict[str, object]:
    out = subprocess.run(["cryptsetup", "token", "export", "--token-id", str(tk_id), image(ks)],
                         check=True, capture_output=True, timeout=30)  # fmt: skip
    got: dict[str, object] = json.loads(out.stdout)
    return got


def nothing_served(ks: Keystore) -> bool:
    disks = json.loads(ks.cli("disk", "list", "--json").stdout)
    return disks[0]["server"] is None and not sock(ks).exists() and not processes(image(ks))


def test_clevis_bound_image_is_served_unattended(ks: Keystore, tang: Tang) -> None:
    write_marker(ks)
    clevis_bind(ks, tang)
    assert token(ks)["keyslots"] == ["1"]
    p = serve_unattended(ks)
    assert f"opened by network (tang {tang.url})" in p.stderr
    assert read_at(str(sock(ks)), len(MARKER), 1 << 20) == MARKER
    opened = [r for r in ks.audit() if r["action"] == "disk.opened"]
    assert opened[0]["detail"] == {"disk": ks.disk, "how": "network", "keyslot": 1}
    ks.cli("disk", "stop", ks.disk)


def test_tang_down_refuses_in_one_line_naming_the_url(ks: Keystore, tang: Tang) -> None:
    clevis_bind(ks, tang)
    tang.stop()
    p = serve_unattended(ks, code=1)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and tang.url in lines[0], p.stderr
    assert f"vmshield vm unlock {ks.vm}" in lines[0] and "Traceback" not in p.stderr
    assert nothing_served(ks)
    tang.start()  # back on its network: the same token opens it again
    serve_unattended(ks)
    ks.cli("disk", "stop", ks.disk)


def test_tampered_jwe_is_refused(ks: Keystore, tang: Tang) -> None:
    clevis_bind(ks, tang)
    tk = token(ks)
    jwe = dict(tk["jwe"])  # type: ignore[call-overload]
    ct = jwe["ciphertext"]
    jwe["ciphertext"] = ("B" if ct[0] != "B" else "C") + ct[1:]
    path = image(ks)
    subprocess.run(["cryptsetup", "token", "remove", "--token-id", "0", path], check=True)
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "0", path],
                   input=json.dumps({**tk, "jwe": jwe}).encode(), check=True)  # fmt: skip
    p = serve_unattended(ks, code=1)
    assert len(p.stderr.strip().splitlines()) == 1 and "clevis token 0" in p.stderr, p.stderr
    assert nothing_served(ks)


def test_vmshield_bind_is_read_by_clevis_and_cryptsetup(ks: Keystore, tang: Tang) -> None:
    write_marker(ks)
    out = ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, "--json",
                 "--password-file", str(ks.pwfile)).stdout  # fmt: skip
    bound = json.loads(out)
    slot = bound["keyslot"]
    assert slot == 1 and bound["pins"] == f"tang {tang.url}"
    assert set(bound["thumbprints"]) <= tang.signing_thumbprints() and bound["thumbprints"]
    path = image(ks)
    listed = subprocess.run(["clevis", "luks", "list", "-d", path], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert (
        listed.strip() == f"{slot}: tang '{json.dumps({'url': tang.url}, separators=(',', ':'))}'"
    )
    passphrase = subprocess.run(["clevis", "luks", "pass", "-d", path, "-s", str(slot)],
                                capture_output=True, check=True).stdout  # fmt: skip
    assert len(passphrase) == 64
    for ks_id, ok in ((slot, 0), (0, 2)):  # accepted for its keyslot only
        test = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-slot",
                               str(ks_id), "--key-file", "-", path],
                              input=passphrase, capture_output=True)  # fmt: skip
        assert test.returncode == ok, test.stderr
    serve_unattended(ks)
    assert read_at(str(sock(ks)), len(MARKER), 1 << 20) == MARKER
    ks.cli("disk", "stop", ks.disk)
    ks.cli("disk", "unbind", ks.disk, "--slot", str(slot), "--password-file", str(ks.pwfile))
    listed = subprocess.run(["clevis", "luks", "list", "-d", path], capture_output=True, text=True)
    assert f"{slot}:" not in listed.stdout
    dump = subprocess.run(["cryptsetup", "luksDump", path], capture_output=True, text=True).stdout
    assert "clevis" not in dump and f"  {slot}: luks2" not in dump
    actions = [r["action"] for r in ks.audit()]
    assert "disk.bind" in actions and "disk.unbind" in actions


def test_hook_serves_a_tang_bound_disk_and_refuses_with_tang_down(
    ks: Keystore, tang: Tang, capsys: pytest.CaptureFixture[str]
) -> None:
    ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, "--password-file", str(ks.pwfile))
    xml = domain(ks)
    code = hook_main([ks.vm, "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml))
    assert code == 0, capsys.readouterr().err
    prep = next(r for r in ks.audit() if r["action"] == "libvirt.prepare")
    assert prep["detail"]["disks"] == {ks.disk: "network"}  # type: ignore[index]
    assert hook_main([ks.vm, "release", "end", "-"], config=ks.config,
                     stdin=io.BytesIO(xml)) == 0  # fmt: skip
    capsys.readouterr()
    tang.stop()
    code = hook_main([ks.vm, "prepare", "begin", "-"], config=ks.config, stdin=io.BytesIO(xml))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and tang.url in err[0], err
    assert not processes(image(ks))


def test_unlock_policy_chooses_the_ways(ks: Keystore, tang: Tang) -> None:
    pw = ("--password-file", str(ks.pwfile))
    ks.cli("disk", "enroll-host", ks.disk, "--host-key", str(ks.host_key), *pw)
    ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, *pw)
    for policy, how in (("any", "network"), ("host-key", "host-key"), ("network", "network")):
        ks.cli("vm", "set", ks.vm, "--unlock", policy)
        assert f"opened by {how}" in serve_unattended(ks).stderr
        ks.cli("disk", "stop", ks.disk)
    tang.stop()  # network only: the host key is not used, the start fails naming the URL
    err = serve_unattended(ks, code=77).stderr.strip().splitlines()
    assert len(err) == 1 and "unlock policy is network" in err[0] and tang.url in err[0], err
    assert nothing_served(ks)
    ks.cli("vm", "set", ks.vm, "--unlock", "owner")
    tang.start()
    err = serve_unattended(ks, code=77).stderr.strip().splitlines()
    assert len(err) == 1 and "unlock policy is owner" in err[0], err
    assert nothing_served(ks)
    assert re.search(r"^unlock: +owner$", ks.cli("vm", "show", ks.vm).stdout, re.M)
    sets = [r["detail"] for r in ks.audit(50) if r["action"] == "vm.set"]
    assert sets == [{"unlock": p} for p in ("any", "host-key", "network", "owner")]


def test_rebind_after_tang_key_rotation(ks: Keystore, tang: Tang) -> None:
    write_marker(ks)
    out = ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, "--json",
                 "--password-file", str(ks.pwfile)).stdout  # fmt: skip
    slot = json.loads(out)["keyslot"]
    old_keys = tang.rotate()
    aside = ks.base / "aside"
    aside.mkdir()
    for key in old_keys:  # without the old keys the old binding is dead
        key.rename(aside / key.name)
    assert tang.url in serve_unattended(ks, code=1).stderr
    for key in old_keys:
        (aside / key.name).rename(key)
    p = ks.cli("disk", "rebind", ks.disk, "--slot", str(slot))
    trusted = {line.split()[-1] for line in p.stdout.splitlines()[1:]}
    assert trusted and trusted <= tang.signing_thumbprints()  # the new signing key
    for key in old_keys:  # the server forgets the old keys: the new binding opens the disk
        key.unlink()
    assert "opened by network" in serve_unattended(ks).stderr
    assert read_at(str(sock(ks)), len(MARKER), 1 << 20) == MARKER
    ks.cli("disk", "stop", ks.disk)
    listed = subprocess.run(["clevis", "luks", "list", "-d", image(ks)], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert listed.startswith(f"{slot}: tang")


def test_bind_with_a_thumbprint_trusts_only_that_key(ks: Keystore, tang: Tang) -> None:
    pw = ("--password-file", str(ks.pwfile))
    before = subprocess.run(["cryptsetup", "luksDump", image(ks)], capture_output=True).stdout
    p = ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, "--thumbprint", "x" * 43,
               *pw, code=1)  # fmt: skip
    assert len(p.stderr.strip().splitlines()) == 1 and "clevis encrypt tang failed" in p.stderr
    assert (
        subprocess.run(["cryptsetup", "luksDump", image(ks)], capture_output=True).stdout == before
    )
    thp = sorted(tang.signing_thumbprints())[0]
    ks.cli("disk", "bind", ks.disk, "tang", "--url", tang.url, "--thumbprint", thp, *pw)
    assert token(ks)["keyslots"] == ["1"]
