"""The `vmshield` CLI in process (CliRunner) over a throwaway SQLite keystore with cheap
verifiers (the `db` and `ready` fixtures are in tests/keystore/conftest.py)."""

from __future__ import annotations

import json
from typing import Any

from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from keystore.auth import AuthPolicy
from keystore.cli import main

PW = "s3cret-horse-battery"
#: argon2 at its cheapest: the tests are about the CLI, not the verifier's cost
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def vms(*args: str, input: str | None = None, code: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def js(*args: str) -> Any:
    return json.loads(vms(*args, "--json").output)
