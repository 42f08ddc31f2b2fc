"""Write man pages for `vmshield` and `usbgate` from their click help (run by scripts/package).

    python scripts/debian/manpages.py OUTDIR VERSION DATE

One page per command (vmshield.1, usbgate.1): the top-level help, then every subcommand
with its usage, help text and options, in the order of the command tree. Nothing is written
by hand, so a page cannot say something the --help does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def roff(text: str) -> str:
    """Text as roff: backslashes escaped, no line starting with a control character."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        line = line.replace("-", "\\-")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def paragraphs(text: str) -> str:
    """click's help: paragraphs, with \\b blocks (kept as written) shown without filling."""
    blocks = []
    for block in text.strip().split("\n\n"):
        if block.lstrip().startswith("\b"):
            body = block.split("\n", 1)[1] if "\n" in block else ""
            blocks.append(".PP\n.nf\n" + roff(body) + "\n.fi")
        else:
            blocks.append(".PP\n" + roff(" ".join(block.split())))
    return "\n".join(blocks)


def options(ctx: click.Context, command: click.Command) -> str:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        name, help_text = record
        lines.append(f".TP\n.B {roff(name)}\n{roff(' '.join(help_text.split()))}")
    return "\n".join(lines)


def walk(
    command: click.Command, path: list[str], parent: click.Context | None
) -> list[tuple[list[str], click.Command, click.Context]]:
    ctx = click.Context(command, info_name=path[-1], parent=parent)
    found = [(path, command, ctx)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found += walk(sub, [*path, name], ctx)
    return found


def page(name: str, root: click.Command, version: str, date: str) -> str:
    entries = walk(root, [name], None)
    _, _, top_ctx = entries[0]
    summary = (root.help or "").strip().splitlines()[0].split(": ", 1)[-1]
    parts = [
        f'.TH {name.upper()} 1 "{date}" "vmshield {version}" "User Commands"',
        ".SH NAME",
        f"{name} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        f".B {name}\n{roff(' '.join(root.collect_usage_pieces(top_ctx)))}",
        ".SH DESCRIPTION",
        paragraphs(root.help or ""),
        ".SH OPTIONS",
        options(top_ctx, root),
    ]
    if len(entries) > 1:
        parts.append(".SH COMMANDS")
    for path, command, ctx in entries[1:]:
        usage = " ".join(command.collect_usage_pieces(ctx))
        parts += [f".SS {roff(' '.join(path))}", f".B {roff(' '.join(path))}\n{roff(usage)}"]
        if command.help:
            parts.append(paragraphs(command.help))
        if opts := options(ctx, command):
            parts.append(".RS\n" + opts + "\n.RE")
    parts += [".SH SEE ALSO", "/usr/share/doc/vmshield/README.md.gz", ""]
    return "\n".join(p for p in parts if p)


def main() -> int:
    outdir, version, date = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    from keystore.cli import main as vmshield
    from usbgate.cli import main as usbgate

    outdir.mkdir(parents=True, exist_ok=True)
    for name, root in (("vmshield", vmshield), ("usbgate", usbgate)):
        (outdir / f"{name}.1").write_text(page(name, root, version, date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
