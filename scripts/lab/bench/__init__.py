"""Every benchmark of vmshield, run by ``scripts/bench`` (see there for the subcommands).

Benchmarks report numbers; they are not timed tests (tests/disk/test_bench_report.py checks
the arithmetic of the disk report only).
"""
