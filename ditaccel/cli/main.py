"""Entry point of the ``ditaccel`` console script."""

from __future__ import annotations

import argparse
import sys

from .errors import UsageError


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a bad option value is one line (what was wrong, where the help is), as
    for the errors the commands raise themselves, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, info, train_router

    parser = argparse.ArgumentParser(
        prog="ditaccel",
        description="Training-free inference acceleration for diffusers diffusion transformers. "
                    "In Python: handle = ditaccel.enable_acceleration(pipe).",
        epilog="Run `ditaccel <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_CommandParser)
    info.add_parser(sub)
    bench.add_parser(sub)
    train_router.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"ditaccel {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nditaccel: error: expected a command (info or bench), got none. "
              "Example: ditaccel bench --help", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, argv) or 0)
    except UsageError as exc:
        print(f"ditaccel {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
