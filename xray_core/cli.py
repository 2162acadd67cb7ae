"""The one command-line convention of `xray-shard` and `xray-pretrain`.

Both CLIs are a table of subcommands, each a module exposing `add_arguments(parser)` and
`run(args) -> int`, imported only when its command runs (so `--help` stays fast and a missing
optional dependency breaks only the command that needs it). `main` is the one place that turns a
user-facing failure into one line on stderr and an exit code:

- 0: done; 1: the command ran and found problems (verify, predict) — the command returns it;
- 2: bad usage or bad input (`ValueError`, a missing or unwritable path, a full disk, argparse);
- 130: interrupted (Ctrl-C), without a traceback.

A command module may define `FAILURE_HINT`, added to an interruption or a file-system error (what
survives and how to continue).

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    module: str  # exposes add_arguments(parser) and run(args) -> int
    help: str


def build_parser(prog: str, description: str, commands: dict[str, Command], argv: list[str]):
    """A parser whose subcommands come from `commands`; only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in commands.items():
        command_parser = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            importlib.import_module(command.module).add_arguments(command_parser)
    return parser


def main(
    prog: str,
    description: str,
    commands: dict[str, Command],
    argv: list[str],
    prepare: Callable[[list[str]], list[str]] | None = None,
) -> int:
    """Parse `argv`, run the chosen command, and turn user errors into one line + exit code."""
    if prepare is not None:
        argv = prepare(argv)
    args = build_parser(prog, description, commands, argv).parse_args(argv)
    where = f"{prog} {args.command}"
    module = importlib.import_module(commands[args.command].module)
    # A command may say what survives a failure half-way (e.g. convert: finished shards are kept).
    hint = getattr(module, "FAILURE_HINT", None)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted; {hint or 'rerun the same command'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as error:
        tail = f"; {hint}" if hint and isinstance(error, OSError) else ""
        print(f"{where}: error: {describe_error(error)}{tail}", file=sys.stderr)
        return EXIT_USAGE


def describe_error(error: BaseException) -> str:
    """One line that says what went wrong and, for the common OS errors, what to do about it."""
    if isinstance(error, OSError) and not isinstance(error, ValueError):
        name = getattr(error, "filename", None)
        where = f"{name}: " if name else ""
        hints = {
            errno.ENOSPC: "no space left on the device; free space or choose another output folder",
            errno.EDQUOT: "disk quota exceeded; free space within the quota",
            errno.EFBIG: "file larger than the file-size limit allows; raise it (ulimit -f)",
            errno.EACCES: "permission denied; choose a folder you can write to",
            errno.EROFS: "read-only file system; choose a writable output folder",
            errno.ENOENT: "no such file or folder",
            errno.ENOTDIR: "a path component is a file, not a folder",
            errno.EISDIR: "is a folder, expected a file",
        }
        hint = hints.get(error.errno)
        return f"{where}{hint}" if hint else f"{where}{error.strerror or error}"
    return " ".join(line.strip() for line in str(error).splitlines()) or type(error).__name__
