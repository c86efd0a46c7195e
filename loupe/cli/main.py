"""`loupe` entry point: argparse dispatch to one module per subcommand.

Library errors (``LoupeError``) become one clear line on stderr and exit code 2; nothing else is
printed by the library.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from loupe import __version__

# name -> (module, one-line help)
COMMANDS = {
    "encoders": ("loupe.cli.cmd_encoders", "list the available encoders (dims, modalities, offline weights)"),
    "index": ("loupe.cli.cmd_index", "embed images (folders, manifests, webdataset tars) into an index"),
    "search": ("loupe.cli.cmd_search", "search an index by text, image or indexed id"),
    "serve": ("loupe.cli.cmd_serve", "serve an index over HTTP with a web page"),
    "explain": ("loupe.cli.cmd_explain", "draw an attribution overlay: why a result matched a query"),
    "dedup": ("loupe.cli.cmd_dedup", "find near-duplicate groups across a whole index"),
    "match": ("loupe.cli.cmd_match", "check whether images are copies of indexed images"),
    "classify": ("loupe.cli.cmd_classify", "name what is in images without a fixed label list"),
    "optimize": ("loupe.cli.cmd_optimize", "build one searchable index per encoder, tuned to a target recall"),
    "info": ("loupe.cli.cmd_info", "describe an index: images, encoders, layout, search parameters"),
    "verify": ("loupe.cli.cmd_verify", "check an index's files against the checksums of its manifest"),
}

EPILOG = """examples:
  loupe index ~/Pictures --out ~/loupe-index --encoder conse-effnet-lite0
  loupe search ~/loupe-index --text "a dog on a beach" -k 10
  loupe serve ~/loupe-index            # then open http://127.0.0.1:8080
  loupe encoders                       # which encoders work offline here

exit status: 0 done, 1 nothing found (search, match, dedup), 2 usage or runtime error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupe", description="Loupe: image retrieval — index, search, explain, deduplicate, classify.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    parser.add_argument("--version", action="version", version=f"loupe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=getattr(module, "EPILOG", None), allow_abbrev=False)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from retrieval.errors import LoupeError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LoupeError as exc:
        print(f"loupe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loupe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:        # disk full, permission denied, ...: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        hint = "; free some space and run the same command again (finished work is kept)" \
            if exc.errno == errno.ENOSPC else ""
        print(f"loupe {args.command}: error: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
