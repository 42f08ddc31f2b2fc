"""The plugin learns about nbdkit -r from nbdkit's argv (config_complete cannot be told)."""

from __future__ import annotations

import pytest

from nbd_plugin.serve.config import readonly_from_argv


@pytest.mark.parametrize(
    ("argv", "readonly"),
    [
        ("nbdkit -U s python p.py image=x", False),
        ("nbdkit -r -U s python p.py image=x", True),
        ("nbdkit -fr -U s python p.py", True),
        ("nbdkit --readonly python p.py", True),
        ("nbdkit --read-only python p.py", True),
        ("nbdkit -U -r python p.py", False),  # "-r" is the socket path here
        ("nbdkit --unix -r python p.py", False),
        ("nbdkit --filter=luks -f python p.py r=1", False),
        ("nbdkit -P /run/r.pid -v python p.py -r", False),  # after the plugin: a plugin arg
        ("nbdkit -vfr python p.py", True),
        ("nbdkit -Ur python p.py", False),  # -U takes "r" as its argument
    ],
)
def test_readonly_flag_detection(argv: str, readonly: bool) -> None:
    assert readonly_from_argv(argv.split()) is readonly
