"""`vmshield doctor`: check this host is ready (the logic: keystore.services.doctor)."""

from __future__ import annotations

from pathlib import Path

import click

from keystore.backends import Location
from keystore.cli.libvirt import DEFAULT_HOOKS_DIR, HOOK_NAME, config_option, hook_text
from keystore.cli.options import db_option, emit_json, json_option, resolve_location
from keystore.services import doctor_host, hookconf
from keystore.services.doctor import (
    Check,
    Status,
    check_data_path,
    check_keystore,
    check_nbdkit,
    exit_status,
    guarded,
)
from keystore.services.nbdproc import plugin_path

#: the plugin the Debian package installs for admins' own nbdkit command lines
PACKAGED_PLUGIN = Path("/usr/lib/vmshield/plugin.py")


def run_checks(location: Location, hook: Path, conf: Path, seconds: float) -> list[Check]:
    plugins = [plugin_path()]
    if PACKAGED_PLUGIN.exists():
        plugins.append(PACKAGED_PLUGIN)
    checks = guarded("nbdkit", lambda: check_nbdkit(plugins[0]))
    if len(plugins) > 1 and checks[-1].name == "plugin":
        checks += [
            c for c in guarded("plugin", lambda: check_nbdkit(plugins[1])) if c.name == "plugin"
        ]
    checks += guarded("data path", lambda: check_data_path(seconds))
    checks += guarded("keystore", lambda: check_keystore(location))
    checks += guarded("dirs", doctor_host.check_dirs)
    checks += guarded("libvirt hook", lambda: doctor_host.check_hook(hook, hook_text(conf)))
    checks += guarded("keyutils", doctor_host.check_keyutils)
    checks += guarded("swap", doctor_host.check_swap)
    checks += guarded("/dev/kvm", doctor_host.check_kvm)
    return checks


@click.command()
@click.option(
    "--hooks-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOOKS_DIR,
    show_default=True,
    help="libvirt's qemu hook directory to look for the vmshield hook in.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(0.05, 10),
    default=1.0,
    show_default=True,
    help="How long to measure the data path's speed.",
)
@config_option
@json_option
@db_option
@click.pass_context
def doctor(
    ctx: click.Context,
    hooks_dir: Path,
    seconds: float,
    config: Path | None,
    as_json: bool,
    db: Location | None,
) -> None:
    """Check that this host is ready to run vmshield, one line per check.

    nbdkit and its Python plugin (the Python it embeds must be vmshield's), the plugin
    loading in it, the data path that will run (numba or the numpy fallback) with its
    speed, the keystore (owner, mode, schema, audit chain head), the run and cache
    directories, the libvirt hook (installed, current, read by libvirtd), keyutils, swap
    (encrypted or off), /dev/kvm, and the PostgreSQL keystore if one is configured.

    Each line is PASS, WARN (works, but weaker or slower), FAIL (fix it before serving
    disks) or SKIP (does not apply), with the fix. Exit status: 0 all passed, 1 a
    warning, 2 a failure.
    """
    conf = hookconf.config_path(config).absolute()
    checks = run_checks(resolve_location(db), hooks_dir.absolute() / HOOK_NAME, conf, seconds)
    status = exit_status(checks)
    if as_json:
        emit_json(
            {
                "checks": [c.as_dict() for c in checks],
                "exit_status": status,
                "worst": Status(status).name,
            }
        )
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            fix = f"  [fix: {c.fix}]" if c.fix and c.status > Status.PASS else ""
            click.echo(f"{c.status.name:4}  {c.name:{width}}  {c.detail}{fix}")
    ctx.exit(status)
