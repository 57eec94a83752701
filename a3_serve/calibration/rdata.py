"""A minimal reader for R's lazy-load data bases (``data/Rdata.rdx`` + ``data/Rdata.rdb``).

R packages ship data sets this way; the built-in Jane Austen corpus (Debian's ``r-cran-janeaustenr``)
is one. We only need character vectors, so this reads the subset of R's XDR serialization format
("R Internals", section 1.8) that such data bases use:

* ``Rdata.rdx``: gzip (or zlib with a 4-byte big-endian length prefix) of a serialized named list
  ``{variables: {name: c(offset, length)}, references, compressed}``;
* ``Rdata.rdb``: at ``offset``, ``length`` bytes = 4-byte big-endian uncompressed size + a zlib stream
  of one serialized object.

Supported object types: NULL, symbols, pairlists (attributes), character, logical, integer and double
vectors, generic vectors (lists), and back references. Anything else raises ``ValueError``.
No R installation is needed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["RVector", "read_lazyload_index", "read_lazyload_object", "unserialize"]

_NILVALUE, _REFSXP = 254, 255
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_NA_INT = -(2**31)


class RVector(list):
    """An R vector as a Python list, with its R attributes (e.g. ``names``) in ``.attrs``."""

    def __init__(self, items, attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs or {}

    def named(self) -> dict:
        """``{name: element}`` using the ``names`` attribute."""
        return dict(zip(self.attrs["names"], self))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def take(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        if len(b) != n:
            raise ValueError("truncated R serialization")
        self.pos += n
        return b

    def item(self) -> Any:
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ == _NILVALUE:
            return None
        if typ == _REFSXP:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if typ == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if typ == _LISTSXP:  # pairlist: used for attributes -> dict
            out: dict = {}
            while True:
                attrs = self.item() if has_attr else None  # noqa: F841 (pairlist cell attributes, unused)
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self.int()
                typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if typ == _NILVALUE:
                    return out
                if typ != _LISTSXP:
                    raise ValueError(f"unsupported pairlist tail of R type {typ}")
        if typ == _CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if typ in (_LGLSXP, _INTSXP):
            n = self.length()
            vals = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            items = [None if v == _NA_INT else (bool(v) if typ == _LGLSXP else v) for v in vals]
        elif typ == _REALSXP:
            n = self.length()
            items = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif typ in (_STRSXP, _VECSXP):
            items = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {typ} in serialized data")
        attrs = self.item() if has_attr else None
        return RVector(items, attrs if isinstance(attrs, dict) else None)


def unserialize(data: bytes) -> Any:
    """Decode one object in R's XDR serialization format (``X\\n`` header, versions 2 and 3)."""
    if data[:2] != b"X\n":
        raise ValueError("not an R XDR serialization (expected the 'X\\n' header)")
    r = _Reader(data)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer's R version, minimal reader version
    if version == 3:
        r.take(r.int())  # native encoding name
    elif version != 2:
        raise ValueError(f"unsupported R serialization version {version}")
    return r.item()


def read_lazyload_index(rdx: Path) -> dict[str, tuple[int, int]]:
    """``{variable name: (offset, length)}`` from a lazy-load index file ``*.rdx``."""
    raw = Path(rdx).read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    index = unserialize(data)
    if not isinstance(index, RVector) or "variables" not in index.attrs.get("names", []):
        raise ValueError(f"{rdx} is not an R lazy-load index (no 'variables' entry)")
    return {name: (int(pos[0]), int(pos[1])) for name, pos in index.named()["variables"].named().items()}


def read_lazyload_object(rdb: Path, offset: int, length: int) -> Any:
    """The object stored at ``offset`` (``length`` bytes) of a lazy-load data base ``*.rdb`` (zlib entries)."""
    with open(rdb, "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    if len(blob) != length:
        raise ValueError(f"{rdb} is truncated")
    return unserialize(zlib.decompress(blob[4:]))
