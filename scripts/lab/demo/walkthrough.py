#!/usr/bin/env python3
"""The vmshield walkthrough that `scripts/demo` runs: the whole system, end to end, on this host.

Read it top to bottom: `main()` is the story, one function per step, and every command it runs
is printed as you would type it (`$DEMO` is the data directory).

  1. A keystore with one user and one VM; an encrypted disk (LUKS2) created for it.
  2. The disk served by the nbdkit plugin; a real Linux guest (the tests' tiny guest, TCG)
     boots from QEMU attached over nbd+unix://, writes the thesis marker, powers off.
  3. Proof: the marker is absent from the ciphertext file and present in the decrypted view;
     a wrong password is refused (by the keystore, audited; and by the LUKS keyslot itself).
  4. USB: usbgate between a simulated USB stick and the running guest's usb-redir; the stick
     is allowed and attaches, then `vmshield usb block` detaches it; the latency is printed.
  5. The thesis's USB experiment: a guest with USB drivers mounts the simulated stick through
     usbgate, checks a file and writes one; revoked while reading, it loses the stick.
  6. Destroy: `vmshield disk destroy --method dod3`, the certificate, the ciphertext gone.
  7. The audit trail, verified.
  8. libvirt (when libvirtd is installed): a private libvirtd runs the vmshield qemu hook;
     `virsh start` is refused without an unlock, boots after `vmshield vm unlock`, starts
     unattended with `vmshield disk enroll-host`; start-to-first-disk-read is timed with the
     hook and with the disk served by hand (scripts/lab/demo/libvirt.py).

Everything lives in one directory (var/demo, or --dir), wiped at the start. Every process
started here (nbdkit servers, QEMU, usbgate, the simulated device) is stopped on the way out,
also after a failed check, an exception or Ctrl-C. Exit status 0 only if every check passed.

The simulated USB stick is usbgate's simulated device owner (usbgate/simulator.py):
this host has no USB stack, so the owner's side (what `usbredirect` does for a real stick) is
played in-process; QEMU's usb-redir side is real. The guest helpers come from scripts/lab/guest.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from keystore.sqlite.usbrules import RulesWatcher
from nbd_plugin.luks import payload_region
from scripts.lab import ROOT
from scripts.lab.demo.libvirt import libvirt_unavailable, step_libvirt
from scripts.lab.demo.support import (
    BIN,
    STEPS,
    Console,
    Host,
    RedirDevice,
    Report,
    SimulatedStick,
    StepFailed,
    prepare,
    wait_audit,
    wait_for_line,
)
from scripts.lab.demo.usb_guest import step_usb_guest
from scripts.lab.guest import (
    DONE,
    FAIL,
    FS_BYTES,
    MARKER,
    PLUGIN,
    RAW_OFFSET,
    Guest,
    build_guest,
    qemu_argv,
    read_export,
    write_secret,
)
from scripts.lab.qmp import Qmp
from usbgate.simulator import FakeDevice

USER, VM, DISK = "alice", "demo", "demo-0"
PASSWORD = b"correct horse battery staple"
WRONG_PASSWORD = b"correct horse battery stapler"
STICK = FakeDevice()  # 0781:5567 (a SanDisk Cruzer's ids), one mass-storage interface
STICK_ID = f"{STICK.vendor_id:04x}:{STICK.product_id:04x}"


# --- the steps -----------------------------------------------------------------------------


def step1_keystore(host: Host, r: Report) -> Path:
    """A keystore, user alice (argon2id verifier), VM demo, and a 64 MiB encrypted disk."""
    secrets = host.path("secrets")
    secrets.mkdir(mode=0o700)
    write_secret(secrets / "alice.pw", PASSWORD)  # mode 0600, no newline: read byte for byte
    write_secret(secrets / "wrong.pw", WRONG_PASSWORD)
    pw = str(secrets / "alice.pw")

    host.vmshield("init")
    host.vmshield("user", "add", USER, "--password-file", pw)
    host.vmshield("vm", "add", VM, "--owner", USER)
    host.vmshield("disk", "create", VM, "--size", "64M", "--password-file", pw)
    disks = json.loads(host.vmshield("disk", "list", "--json", show=False).stdout)
    disk = next((d for d in disks if d["name"] == DISK), None)
    r.check(
        disk is not None and disk["state"] == "ready",
        f"keystore has user {USER}, VM {VM} and disk {DISK} (state ready)",
        fatal=True,
    )
    assert disk is not None
    image = Path(disk["path"])
    head = image.read_bytes()[:6]
    r.check(
        head == b"LUKS\xba\xbe",
        f"{image} is a LUKS container ({disk['format']}, {disk['cipher']}, "
        f"{disk['size'] // 2**20} MiB of plaintext)",
        fatal=True,
    )
    return image


def start_guest(
    host: Host,
    guest: Guest,
    sock: Path,
    mode: str,
    *,
    readonly: bool = False,
    extra: list[str] | None = None,
) -> Console:
    """QEMU running the test guest in `mode`, its disk the NBD export on `sock` (TCG)."""
    argv = qemu_argv(guest, sock, mode)  # scripts/lab/guest.py: the same command line the tests use
    if readonly:
        argv[argv.index("-drive") + 1] += ",readonly=on"  # for a read-only server (nbdkit -r)
    argv += extra or []
    proc = host.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return Console(host, proc)


def serve(host: Host, *, readonly: bool = False) -> Path:
    """`vmshield disk serve`: the owner's password -> keystore check -> nbdkit over a pipe."""
    sock = host.path(f"run/{DISK}{'-ro' if readonly else ''}.sock")
    ro = ["--readonly"] if readonly else []
    pw = str(host.path("secrets/alice.pw"))
    host.vmshield("disk", "serve", DISK, *ro, "--socket", str(sock), "--password-file", pw,
                  limit=1 if readonly else None)  # fmt: skip
    return sock


def step2_guest_writes(host: Host, r: Report, guest: Guest) -> None:
    """The guest boots from the encrypted disk over NBD and writes the marker."""
    sock = serve(host)
    started = time.monotonic()
    console = start_guest(host, guest, sock, "write")
    said = console.wait_for(rf"^({DONE}|{FAIL}).*", 90).group(0)
    r.output(f"guest: {said}")
    code = console.finish(30)
    r.check(
        said == f"{DONE} mode=write" and code == 0,
        f"the guest wrote the marker through the plugin and powered off "
        f"({time.monotonic() - started:.1f} s under TCG)",
        fatal=True,
    )
    host.vmshield("disk", "stop", DISK)  # flushes and closes: the master key leaves memory


def step3_proof(host: Host, r: Report, image: Path) -> Path:
    """Ciphertext at rest, plaintext for the key holder, nothing for a wrong password."""
    data = image.read_bytes()
    print(f"  reading {r.shown(str(image))} ({len(data)} bytes) as a thief would")
    # The LUKS2 header's JSON says "encryption", so look for fragments in the payload only.
    offset, length = payload_region(str(image))
    payload = data[offset : offset + length]
    leaked = [MARKER[i : i + 8] for i in range(len(MARKER) - 7) if MARKER[i : i + 8] in payload]
    r.check(
        MARKER not in data and not leaked,
        f"the marker is absent from the ciphertext file; its encrypted payload (from byte "
        f"{offset}) holds not even an 8-byte fragment of it",
    )

    # A wrong password: the keystore refuses it and writes it into the audit trail ...
    host.vmshield(
        "disk", "serve", DISK, "--password-file", str(host.path("secrets/wrong.pw")), expect=77
    )
    last = host.audit(1)[-1]
    r.check(
        last["action"] == "auth.fail" and last["detail"].get("user") == USER,
        f"wrong password refused and audited: #{last['seq']} {last['action']} "
        f"{json.dumps(last['detail'], sort_keys=True)}",
    )

    # ... and even bypassing the keystore, the LUKS keyslot itself refuses it.
    argv = ["nbdkit", "-f", "-U", str(host.path("run/bypass.sock")), "python", PLUGIN,
            f"image={image}", f"passphrase=+{host.path('secrets/wrong.pw')}"]  # fmt: skip
    r.command(argv)
    try:
        bypass = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        refused, said = bypass.returncode != 0, (bypass.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        refused, said = False, "nbdkit kept running: it accepted the wrong passphrase"
    r.output(said)
    r.check(
        refused,
        "nbdkit with the plugin, given the wrong passphrase directly, stops before listening",
    )

    # The right password opens the decrypted view (read-only server) for the key holder.
    sock = serve(host, readonly=True)
    plain = read_export(str(sock))
    in_file = plain.find(MARKER + b"\n", 0, FS_BYTES)
    raw = plain[RAW_OFFSET : RAW_OFFSET + len(MARKER)]
    r.check(
        in_file >= 0 and raw == MARKER,
        f"the decrypted view holds the marker: in /marker.txt (ext2, plaintext byte "
        f"{in_file}) and raw at byte {RAW_OFFSET} (48 MiB)",
    )
    return sock


def step4_usb(host: Host, r: Report, guest: Guest, disk_sock: Path) -> None:
    """usbgate between a simulated stick and the running guest's usb-redir: allow, then block."""
    redir, qmp_path = host.path("run/usbredir0.sock"), host.path("run/qmp.sock")
    gate, gate_log = host.path("run/usbgate.sock"), host.path("run/usbgate.log")
    host.vmshield("usb", "allow", VM, STICK_ID, show=False)
    host.vmshield("usb", "list", VM)

    # The guest runs in shell mode from the read-only decrypted disk, with an xhci controller
    # and a usb-redir device whose chardev usbgate connects to, and a QMP socket to watch it.
    console = start_guest(host, guest, disk_sock, "shell", readonly=True, extra=[
        "-device", "qemu-xhci",
        "-chardev", f"socket,id=usbredir0,path={redir},server=on,wait=off",
        "-device", "usb-redir,chardev=usbredir0,id=usb0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ])  # fmt: skip
    with gate_log.open("wb") as log:
        usbgate = host.start([str(BIN / "usbgate"), "run", "--vm", VM, "--listen",
                              f"unix:{gate}", "--qemu", f"unix:{redir}", "--db", str(host.db)],
                             stderr=log)  # fmt: skip
    said = wait_for_line(gate_log, "listening on", 20)
    r.output(said)
    r.check("listening on" in said, f"usbgate for VM {VM} is up", fatal=True)

    console.wait_for(r"^vmshield guest shell", 90)
    console.send('mount -t ext2 -o ro /dev/vda /mnt && echo "GUEST-READ: $(cat /mnt/marker.txt)"')
    seen = console.wait_for(r"^GUEST-READ: (.*)$", 30).group(1)
    r.output(f"guest: {seen}")
    r.check(seen == MARKER.decode(), "the guest is up and reads the marker from its disk")
    usb0 = RedirDevice(Qmp(str(qmp_path)), "usb0")
    host.cleanups.append(usb0.qmp.close)

    # Plug the stick in (on the owner's side): usbgate probes its descriptors, asks the rules.
    stick = SimulatedStick(f"unix:{gate}", STICK)
    host.cleanups.append(stick.close)
    print(f"  plugging in the simulated USB stick {STICK_ID} (mass storage, serial "
          f"{STICK.serial}) on the owner's side of usbgate")  # fmt: skip
    plugged = time.monotonic()
    stick.plug()
    seen_at = usb0.wait(attached=True, timeout=10)
    r.check(seen_at is not None, f"allowed by rule 'allow {STICK_ID}': QEMU attached it "
            f"(QMP attached=true after {((seen_at or plugged) - plugged) * 1000:.0f} ms)",
            fatal=True)  # fmt: skip

    # Block it while attached: a new rule in front of the allow rule.
    committed, detached, took = block_and_time(host, r, usb0)
    r.check(detached is not None, "`vmshield usb block` detached it (QMP attached=false)",
            fatal=True)  # fmt: skip
    rows = wait_audit(host, "usb.revoked", 5)
    revoked = next((x for x in rows if x["action"] == "usb.revoked"), None)
    gate_ms = revoked["detail"].get("latency_ms") if revoked else None
    print(f"  latency: usbgate, from seeing the new rule to device_disconnect: {gate_ms} ms "
          "(audit usb.revoked)")  # fmt: skip
    if committed is not None and detached is not None:
        # Both are polled in one loop (~1 ms a round): a detach seen in the same round as the
        # commit, or one round before it, happened within that round.
        e2e_ms = (detached - committed) * 1000
        e2e = f"{e2e_ms:.1f} ms" if e2e_ms >= 1 else "under 1 ms (one polling round)"
        print(f"           rule committed to the keystore -> QEMU reports detached: {e2e} "
              "(usbgate polls the rules every 10 ms)")  # fmt: skip
        print(f"           the whole `vmshield usb block` command: {took * 1000:.0f} ms "
              "(Python start-up, synchronous SQLite commit)")  # fmt: skip
        r.check(e2e_ms < 50, f"detached {e2e} after the rule was committed (target: 50 ms)")
    else:
        r.check(False, "the rule's commit was seen in the keystore")
    r.check(stick.wait_closed(5) and stick.was_rejected(),
            "usbgate told the owner (filter_reject) and hung up")  # fmt: skip

    # Power the guest off: leaving the shell ends /init (done-line, poweroff).
    console.send("umount /mnt; exit")
    console.wait_for(rf"^{DONE} mode=shell", 30)
    r.check(console.finish(30) == 0, "the guest powered off; QEMU exited")
    host.stop(usbgate)


def block_and_time(
    host: Host, r: Report, usb0: RedirDevice
) -> tuple[float | None, float | None, float]:
    """Run `vmshield usb block`; meanwhile watch the VM's rules the way usbgate does
    (keystore.sqlite.usbrules.RulesWatcher: when the commit becomes visible) and QEMU over QMP.
    Returns (rule committed, QEMU detached, command's duration); times are monotonic."""
    watcher = RulesWatcher(host.db, VM)
    try:
        argv = [str(BIN / "vmshield"), "usb", "block", VM, STICK_ID, "--position", "1"]
        r.command(argv)
        started = time.monotonic()
        block = subprocess.Popen(argv, env=host.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)  # fmt: skip
        committed = detached = None
        while (committed is None or detached is None) and time.monotonic() < started + 30:
            if committed is None and watcher.poll() is not None:
                committed = time.monotonic()
            if detached is None and not usb0.attached():
                detached = time.monotonic()
            time.sleep(0.0005)
        out = block.communicate(timeout=30)[0].decode(errors="replace")
        took = time.monotonic() - started
    finally:
        watcher.close()
    if block.returncode != 0:
        r.output(out)
        raise StepFailed(f"vmshield usb block exited {block.returncode}")
    return committed, detached, took


def step5_destroy(host: Host, r: Report, image: Path) -> None:
    """Deep erase: crypto-erase, DoD 3-pass overwrite, verify, discard, unlink, certificate."""
    host.vmshield("disk", "stop", DISK)
    host.vmshield("perm", "set", VM, "--deep-erase", "yes")
    host.vmshield("disk", "destroy", DISK, "--method", "dod3", "--yes")
    row = next(x for x in reversed(host.audit(5)) if x["action"] == "disk.state")
    cert_path = Path(row["detail"].get("certificate", ""))
    r.check(
        row["detail"].get("to") == "destroyed" and cert_path.is_file(),
        f"disk {DISK} destroyed; certificate {cert_path}",
    )
    raw = cert_path.read_bytes()
    r.check(hashlib.sha256(raw).hexdigest() == row["detail"].get("certificate_sha256"),
            "the certificate's SHA-256 is the one recorded in the audit chain")  # fmt: skip
    cert = json.loads(raw)
    print("  certificate (one line per field):")
    for key, value in cert.items():
        r.output(f"{key}: {json.dumps(value, sort_keys=True)}")
    r.check(
        cert["crypto_erase"]["performed"] and cert["verification"]["result"] == "passed",
        "keyslots wiped first (crypto-erase), then 00/FF/random, last pass verified",
    )
    r.check(not image.exists(), f"the ciphertext file is gone ({image})")


def step6_audit(host: Host, r: Report) -> None:
    """Every step above left a row; each row carries the hash of the one before."""
    host.vmshield("audit")
    actions = {x["action"] for x in host.audit(1000)}
    wanted = {
        "user.add",
        "vm.add",
        "disk.serve",
        "auth.fail",
        "usb.allowed",
        "usb.revoked",
        "disk.state",
    }
    r.check(wanted <= actions, f"the trail holds {', '.join(sorted(wanted))}")
    verify = host.vmshield("audit", "verify", expect=0)
    r.check(verify.stdout.startswith("ok"), "the hash chain verifies")


# --- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=ROOT / "var" / "demo",
        help="data directory, wiped at the start (default: var/demo)",
    )
    parser.add_argument("--kernel", type=Path, help="guest kernel (default: scripts/build-guest)")
    parser.add_argument("--initrd", type=Path, help="guest initramfs (with --kernel)")
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)  # scripts/demo's clock
    args = parser.parse_args(argv)
    started = args.started or time.time()
    demo_dir = args.dir.absolute()

    # SIGTERM/SIGHUP unwind like Ctrl-C does, so the finally below stops everything.
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    prepare(demo_dir, DISK)
    r = Report(demo_dir)
    no_libvirt = libvirt_unavailable()
    r.total = STEPS if no_libvirt else STEPS + 1
    host = Host(demo_dir, r)
    guest = Guest(args.kernel, args.initrd) if args.kernel and args.initrd else build_guest()
    print(
        f"vmshield demo: data in DEMO={demo_dir} (wiped at the start); "
        f"VMSHIELD_DB=$DEMO/keystore.db"
    )
    print(f"guest: {guest.kernel.name} + {guest.initrd.name} (scripts/build-guest), TCG")
    if no_libvirt:
        print(f"libvirt step skipped: {no_libvirt}")
    failure = ""
    try:
        with r.step(1, "A keystore with one user and one VM; an encrypted disk for it"):
            image = step1_keystore(host, r)
        with r.step(2, "The disk served by the plugin; a real guest writes the marker over NBD"):
            step2_guest_writes(host, r, guest)
        with r.step(3, "Proof: ciphertext at rest, plaintext for the key holder, wrong password"):
            sock = step3_proof(host, r, image)
        with r.step(4, "USB: usbgate between a simulated stick and the running guest"):
            step4_usb(host, r, guest, sock)
        with r.step(5, "USB end to end: a guest mounts the stick through usbgate, then loses it"):
            step_usb_guest(host, r, VM)
        with r.step(6, "Destroy: vmshield disk destroy --method dod3"):
            step5_destroy(host, r, image)
        with r.step(7, "The audit trail, verified"):
            step6_audit(host, r)
        if r.total > STEPS:
            with r.step(8, "libvirt: virsh start serves the disk through the vmshield qemu hook"):
                step_libvirt(host, r, guest)
    except StepFailed as exc:
        failure = f"stopped: {exc}"
        r.check(False, failure)
    except KeyboardInterrupt as exc:
        failure = f"interrupted: {str(exc) or 'SIGINT'}"
        print(f"\n  ✘ {failure}", flush=True)
    except Exception as exc:  # report it like a failed check, after cleaning up
        traceback.print_exc()
        failure = f"error: {type(exc).__name__}: {exc}"
        r.check(False, failure)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        print("\nstopping what the demo started ...", flush=True)
        host.close()

    total = time.time() - started
    failed = [text for text, ok in r.checks if not ok]
    print("\nSummary")
    for title, ok, seconds in r.steps:
        print(f"  {'✔' if ok else '✘'} {title:<78} {seconds:5.1f} s")
    if failed or failure or len(r.steps) < r.total:
        why = failure.splitlines()[0].rstrip(";:") if failure else ""
        print(
            f"✘ vmshield demo FAILED{f' ({why})' if why else ''}: {len(failed)} of "
            f"{len(r.checks)} checks failed, {r.total - len(r.steps)} of {r.total} steps not run; "
            f"total {total:.1f} s"
        )
        return 1
    print(
        f"✔ vmshield demo passed: all {len(r.checks)} checks in {total:.1f} s "
        f"(setup and guest build included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
