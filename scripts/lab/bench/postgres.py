"""Benchmark: how fast a USB rule change reaches a listening usbgate, as the keystore grows.

    python -m scripts.lab.bench.postgres [--db URL] [--vms 100,1000,10000] [--rules-per-vm 10]

Without --db it starts a throwaway cluster (scripts.lab.tempcluster; PostgreSQL 15
from Debian). For each size it fills a fresh keystore with that many VMs and rules (bulk
SQL: the data, not the write path, is what is being scaled), starts RulesListeners the way
hosts would (--listeners connections, the VMs split between them), then commits --changes
rule changes through the repository (with their audit rows, as `vmshield usb block` does)
on random VMs and times commit -> the listener holding the new rules. Prints one JSON line
per size. Not a test: it takes minutes at 10,000 VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import psycopg
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.postgres.notify import RulesListener
from keystore.postgres.repository import PostgresRepository

_FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
_TS = "2026-12-01T00:00:00+00:00"


def populate(url: str, vms: int, rules_per_vm: int) -> list[str]:
    """`vms` VMs of one owner with `rules_per_vm` rules each; their names."""
    names = [f"vm{i:05d}" for i in range(vms)]
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO principals (name, verifier, created) VALUES ('bench', 'x', %s)", (_TS,)
        )
        with cur.copy("COPY vms (uuid, name, owner, created) FROM STDIN") as copy:
            uuids = [str(uuidlib.uuid4()) for _ in names]
            for u, n in zip(uuids, names, strict=True):
                copy.write_row((u, n, "bench", _TS))
        with cur.copy(
            "COPY usb_rules (vm_uuid, position, action, vendor_id, product_id, created) FROM STDIN"
        ) as copy:
            for u in uuids:
                for p in range(1, rules_per_vm + 1):
                    copy.write_row((u, p, "allow", 0x1000 + p, 0x2000 + p, _TS))
        cur.execute("ANALYZE")
    return names


def _split(names: list[str], parts: int) -> list[list[str]]:
    return [names[i::parts] for i in range(parts)]


def measure(url: str, names: list[str], listeners: int, changes: int) -> dict[str, Any]:
    groups = _split(names, listeners)
    t0 = time.perf_counter()
    ls = [RulesListener(url) for _ in groups]
    for listener, group in zip(ls, groups, strict=True):
        listener.watch_many(group, timeout=900)
    watch_s = time.perf_counter() - t0
    owner = {vm: listener for listener, g in zip(ls, groups, strict=True) for vm in g}
    lat: list[float] = []

    async def go() -> None:
        repo = await PostgresRepository.open(url, policy=_FAST)
        try:
            for vm in random.Random(16).sample(names, changes):
                listener = owner[vm]
                listener.take(vm)
                await repo.add_usb_rule(vm, UsbAction.BLOCK, 0x0781, 0x5567, actor="bench",
                                        position=1)  # fmt: skip
                committed = time.perf_counter()
                deadline = committed + 10
                while (new := listener.take(vm)) is None and time.perf_counter() < deadline:
                    await asyncio.sleep(0.0002)
                if new is None or new[0].action is not UsbAction.BLOCK:
                    raise RuntimeError(f"{vm}: the change did not arrive within 10 s")
                lat.append((time.perf_counter() - committed) * 1000)
        finally:
            await repo.close()

    try:
        asyncio.run(go())
    finally:
        for listener in ls:
            listener.close()
    lat.sort()
    return {
        "vms": len(names),
        "listeners": listeners,
        "changes": changes,
        "watch_all_s": round(watch_s, 2),
        "latency_ms": {
            "median": round(statistics.median(lat), 2),
            "p95": round(lat[int(len(lat) * 0.95) - 1], 2),
            "max": round(lat[-1], 2),
        },
    }


@contextlib.contextmanager
def _databases(db: str | None) -> Iterator[Any]:
    if db is not None:
        yield lambda: db
        return
    from scripts.lab.tempcluster import running_cluster

    with running_cluster() as cluster:
        yield cluster.keystore


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="scripts/bench postgres", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--db", help="an EMPTY, initialised keystore URL (default: a temp cluster)")
    ap.add_argument("--vms", default="100,1000,10000", help="comma-separated sizes")
    ap.add_argument("--rules-per-vm", type=int, default=10)
    ap.add_argument("--listeners", type=int, default=4, help="LISTEN connections (hosts)")
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.vms.split(",")]
    if args.db and len(sizes) > 1:
        ap.error("--db takes one size (the database must start empty)")
    with _databases(args.db) as fresh:
        for n in sizes:
            url = fresh()
            t0 = time.perf_counter()
            names = populate(url, n, args.rules_per_vm)
            fill = time.perf_counter() - t0
            result = measure(url, names, min(args.listeners, n), min(args.changes, n))
            result.update(rules=n * args.rules_per_vm, populate_s=round(fill, 2))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
