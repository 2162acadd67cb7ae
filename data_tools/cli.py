"""`xray-shard`: turn X-ray archives into verified WebDataset shards.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
`xray_core.cli` (shared with `xray-pretrain`) imports only the chosen one and turns user errors into
one line and an exit code.
"""

from __future__ import annotations

import sys

from xray_core.cli import Command
from xray_core.cli import main as cli_main

COMMANDS = {
    "synth": Command(
        "data_tools.synth", "write synthetic chest radiographs as real DICOM files + labels.csv"
    ),
    "convert": Command("data_tools.convert", "convert DICOM/PNG/JPEG + labels into WebDataset shards"),
    "verify": Command(
        "data_tools.verify", "re-read every shard, index and manifest; non-zero exit on mismatch"
    ),
    "stats": Command("data_tools.stats", "print the counts and intensity statistics of a shard folder"),
    "preview": Command("data_tools.preview", "contact sheet of samples with keys, labels and chest region"),
    "index": Command("data_tools.index", "write DALI .idx files for tars made elsewhere"),
    "refresh-roi": Command(
        "data_tools.refresh_roi", "re-estimate the chest region of existing shards in place"
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main("xray-shard", __doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
