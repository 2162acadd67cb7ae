"""`xray-shard`: turn X-ray archives into verified WebDataset shards.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `xray-shard --help` stays fast and a missing
optional dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS = {
    "synth": ("data_tools.synth", "write synthetic chest radiographs as real DICOM files + labels.csv"),
    "convert": ("data_tools.convert", "convert DICOM/PNG/JPEG + labels into WebDataset shards"),
    "verify": ("data_tools.verify", "re-read every shard, index and manifest; non-zero exit on mismatch"),
    "stats": ("data_tools.stats", "print the counts and intensity statistics of a shard folder"),
    "preview": ("data_tools.preview", "contact sheet of samples with keys, labels and chest region"),
    "index": ("data_tools.index", "write DALI .idx files for tars made elsewhere"),
    "refresh-roi": ("data_tools.refresh_roi", "re-estimate the chest region of existing shards in place"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-shard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (to add its arguments).
        if name == chosen:
            importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
