"""File names as text that Parquet, JSON and HTML can hold, losslessly, whatever bytes the OS allowed in them.

Python gives a name that is not valid UTF-8 as a str with lone surrogates (PEP 383), which UTF-8 writers refuse.
Such a name is stored escaped: every byte that is not part of valid UTF-8 becomes `\\xNN` and a backslash becomes
`\\\\`, and the row carries `path_escaped = true`. Names that are valid UTF-8 are stored as they are, unflagged, so
ordinary rows read exactly as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def is_clean(name: str) -> bool:
    """True when `name` encodes to UTF-8 as it is (no surrogate-escaped bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_text(name: str) -> tuple[str, bool]:
    """(storable text, escaped flag) for a name as Python's os functions return it."""
    if is_clean(name):
        return name, False
    raw = os.fsencode(name).replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace"), True


def from_text(text: str, escaped: bool | None) -> str:
    """The name `to_text` stored, back as the str the os functions take."""
    if not escaped:
        return text
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        out += text[pos:match.start()].encode("utf-8")
        token = match.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = match.end()
    out += text[pos:].encode("utf-8")
    return os.fsdecode(bytes(out))


def display(name: str) -> str:
    """A name (or any text) that UTF-8 writers, messages and logs accept, never raising: unchanged when it already is;
    surrogate-escaped bytes escaped as `to_text` does; any other lone surrogate as `\\udXXX`."""
    try:
        return to_text(name)[0]
    except UnicodeEncodeError:  # a lone surrogate that no file name's bytes produce (e.g. from JSON)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def relative_text(path: Path, root: Path) -> tuple[str, bool]:
    """`path` relative to `root` with POSIX separators, as storable text and its escaped flag. A path spelled under
    `root` (what `iter_files` lists) is cut as a string: a resume filters a million of them."""
    text, base = os.fspath(path), os.fspath(root).rstrip(os.sep) + os.sep
    if os.sep == "/" and text.startswith(base) and "/." not in text and "//" not in text:
        return to_text(text[len(base):])
    return to_text(Path(path).relative_to(root).as_posix())


def source_path(root: Path, text: str, escaped: bool | None = False) -> Path:
    """The file a stored relative path names under `root`."""
    return Path(root) / from_text(text, escaped)
