"""The lab: everything that builds, runs and measures vmshield without being vmshield.

Not installed (the wheel and the .deb hold only nbd_plugin, keystore and usbgate) and never
imported by them (an import-linter contract); the tests, the demo and the benchmarks import it
as ``scripts.lab`` from the repository root (``python -m scripts.lab.<module>``).

- build_guest (+ guest-init.sh): the tiny Linux test guests, with or without USB
  (``scripts/build-guest``); guest: booting them under TCG against an NBD server, nbdkit;
- libvirtd: a private libvirtd in its own mount namespace;
- qmp: a small QMP client, QEMU with a usb-redir chardev; usb_rig: a USB guest, usbgate and a
  simulated stick wired together;
- tempcluster: a throwaway PostgreSQL cluster;
- demo/: the end-to-end walkthrough (``scripts/demo``);
- bench/: every benchmark (``scripts/bench``): disk/ (the data path against its peers), erase,
  usb and usb_relay, startup (the CLI's start time), postgres (the cluster backend at scale).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository checkout the lab runs from."""
