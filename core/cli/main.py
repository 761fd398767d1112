"""``lesionlab COMMAND …``: every command line in one place (installed by ``pip install -e .``).

Each command is one module of this package with a ``main(argv)``; ``python -m core.cli.COMMAND`` runs the same
module without the installed script (the app's background jobs start the trainer that way).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module, what it does); modules are imported only when their command runs, so `lesionlab --help`
# does not pay for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("core.cli.train", "train a model (presets, every TrainConfig setting as a flag)"),
    "evaluate": ("core.cli.evaluate", "a model's metrics on a dataset split; --shifts for its robustness report"),
    "predict": ("core.cli.predict", "predictions for images, folders or .zip archives (--csv)"),
    "ensemble": ("core.cli.ensemble", "one ensemble file from finished runs"),
    "operating-point": ("core.cli.operating_point", "choose and store a model's melanoma threshold"),
    "download": ("core.cli.download", "download HAM10000 (and the ISIC 2018 test set)"),
    "jobs": ("core.cli.jobs", "the app's background jobs: status, stop, worker"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: lesionlab COMMAND [ARGS…]\n\ncommands:\n" + "\n".join(lines) + "\n\n'lesionlab COMMAND --help' for one."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
