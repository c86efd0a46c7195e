"""`loupe verify DIR`: check an index's files against the sizes and checksums its manifest records."""

from __future__ import annotations

import json

DESCRIPTION = """Check every file of an index: its size and SHA-256 against those the manifest recorded when
it was written, and what it holds (vector dimensions and counts, unit vectors, ids, local-feature
offsets). Prints one line per damaged file and a summary; exit 0 when the index is clean, 2 otherwise.
Indexes written by an older Loupe have no checksums: their files are checked for what they hold."""

EPILOG = """examples:
  loupe verify ~/loupe-index
  loupe verify ~/loupe-index --json

exit status: 0 the index is clean, 2 a file is damaged or missing (or a usage or runtime error)."""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="the index folder")
    p.add_argument("--sizes-only", action="store_true", help="check sizes, not checksums (faster on a large index)")
    p.add_argument("--json", action="store_true",
                   help='print {"ok", "index", "images", "files", "bytes", "seconds", "unrecorded", '
                        '"problems": [{"file", "message"}]}')


def run(args) -> int:
    from retrieval.index.verify import verify_index

    report = verify_index(args.dir, checksums=not args.sizes_only)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for problem in report.problems:
            print(f"{problem.file}: {problem.message}")
        print(report.summary())
    return 0 if report.ok else 2
