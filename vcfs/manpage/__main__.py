"""`python -m vcfs.manpage [--tree-md]`: print the roff manual page (or docs/tree.md).

The generator of packaging/vcfs.1 and docs/tree.md: it joins the command line's parser with
the renderers, which is why it is not in vcfs.manpage itself (the command line imports that).
"""

from __future__ import annotations

import argparse
import sys

from vcfs.cli import parser
from vcfs.manpage import render
from vcfs.treedoc import tree_markdown


def main(argv: list[str] | None = None) -> int:
    """Print the roff page, or docs/tree.md with --tree-md."""
    ap = argparse.ArgumentParser(prog="python -m vcfs.manpage")
    ap.add_argument("--tree-md", action="store_true", help="print docs/tree.md instead")
    args = ap.parse_args(argv)
    sys.stdout.write(tree_markdown() if args.tree_md else render(parser()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
