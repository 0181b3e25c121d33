"""
The file store's names and paths: the file-system name of an id, and
where an agent's directory, its run files, its index and the store's lock
lie.

    <data-dir>/runs/<agent-dir>/<run-file>.jsonl   one JSON record per line
    <data-dir>/runs/<agent-dir>/.index             the agent's runs, in start order (and drops)
    <data-dir>/runs/.lock                          held by the daemon using the store
"""

import hashlib
import re
from typing import Optional

RUNS = "runs"
INDEX = ".index"
LOCK = ".lock"
RUN_SUFFIX = ".jsonl"

#: Bytes a name keeps as they are. Upper case is escaped too, so ids that
#: differ only in case stay distinct on case-insensitive filesystems, and
#: "." is escaped, so no name is ".", ".." or hidden.
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX = frozenset("0123456789abcdef")
#: Longer encodings become a prefix, "~" and a digest: filesystems cap a
#: name at 255 bytes. "~" never appears in a plain encoding.
_LONGEST_PLAIN = 120
_HASHED_PREFIX = 64
#: An id that is its own name (every run id the daemon mints, most agent
#: ids): loading checks a million names, every start one.
_OWN_NAME = re.compile(r"[a-z0-9_-]{1,120}")


def encode_name(identifier: str) -> str:
    """
    The file-system name for an agent or run id: only C{[a-z0-9_-%~]}, never
    empty, at most 120 characters. Plain names are reversed by
    L{decode_name}; a hashed (long) name is reversed by the record inside:
    the index header names its agent, the ``started`` record its run.
    """
    if _OWN_NAME.fullmatch(identifier):
        return identifier
    raw = identifier.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _PLAIN else f"%{b:02x}" for b in raw) or "%"
    if len(name) > _LONGEST_PLAIN:
        name = f"{name[:_HASHED_PREFIX]}~{hashlib.sha256(raw).hexdigest()[:32]}"
    return name


def decode_name(name: str) -> Optional[str]:
    """The id a plain name encodes; None for a hashed or foreign name."""
    if name == "%":
        return ""
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%":
            digits = name[i + 1 : i + 3]
            if len(digits) != 2 or not _HEX.issuperset(digits) or int(digits, 16) in _PLAIN:
                return None
            raw.append(int(digits, 16))
            i += 3
        elif name[i].isascii() and ord(name[i]) in _PLAIN:
            raw.append(ord(name[i]))
            i += 1
        else:
            return None
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
