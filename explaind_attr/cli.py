"""The command line moved to `explaind_attr.app.cli`; this alias keeps `explaind` console
scripts installed before the move (and `python -m explaind_attr.cli`) working."""

from __future__ import annotations

import sys

from .app.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
