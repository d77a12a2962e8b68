"""The `sha256sum` line: one format for the mount's checksum files and the backup store's.

A line is the hex digest, two spaces (text mode) and the file name, as `sha256sum` prints it
and `sha256sum -c` reads it. Pure: no I/O.
"""

from __future__ import annotations

HEX = frozenset("0123456789abcdef")


def line(digest: str, name: str) -> str:
    """One line of `sha256sum` output for file `name`."""
    return f"{digest}  {name}\n"


def line_size(name: str) -> int:
    """The length in bytes of a line naming `name`, known before the digest is."""
    return len(line("0" * 64, name).encode())


def parse(text: str) -> tuple[str, str]:
    """(digest, file name) of a one-line sha256sum file; ValueError if it is not one.

    Binary-mode lines (`*name`) are read as well, as `sha256sum -c` reads them.
    """
    lines = text.splitlines()
    if len(lines) != 1:
        raise ValueError(f"{len(lines)} lines, expected one")
    digest, sep, name = lines[0].partition(" ")
    name = name[1:] if name[:1] in (" ", "*") else name
    if not sep or len(digest) != 64 or not set(digest) <= HEX or not name:
        raise ValueError(f"not a sha256sum line: {lines[0]!r}")
    return digest, name
