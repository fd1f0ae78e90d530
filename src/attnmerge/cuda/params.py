"""The kernel parameter block, derived from its C++ declaration.

The kernels take one struct by value (``MergeParams`` in csrc/merge.cuh). Its fields are
read here from that declaration, so the packing in Python cannot drift from the kernel:
each line of the struct declares pointers (``T* a;``, ``const T* a, b;``) or 32-bit
unsigned integers (``u32 a, b;``), laid out with C's natural alignment.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

__all__ = ["ParamBlock"]

_STRUCT = r"struct\s+{name}\s*\{{(?P<body>.*?)\n\}};"
_LINE = re.compile(r"^\s*(?:const\s+)?(?P<type>\w+)\s*(?P<ptr>\*?)\s*(?P<names>[\w\s,*]+);")
# struct format character and size of each field kind
_KINDS = {"pointer": ("Q", 8), "u32": ("I", 4)}


class ParamBlock:
    """The packing of one C++ parameter struct.

    Attributes:
        fields: the field names in declaration order.
        size: bytes of the packed struct (its ``sizeof``).
        offsets: the byte offset of each field in the struct, by name.
        pack: ``pack(**fields) -> bytes``, every field by keyword (a missing or unknown one
            raises TypeError); a value that does not fit its field raises ``struct.error``.
    """

    def __init__(self, source: str, name: str) -> None:
        match = re.search(_STRUCT.format(name=re.escape(name)), source, re.DOTALL)
        if match is None:
            raise ValueError(f"no struct {name} in the kernel source")
        kinds: list[tuple[str, str]] = []
        for line in match.group("body").splitlines():
            line = line.split("//")[0]
            if not line.strip():
                continue
            m = _LINE.match(line)
            if m is None:
                raise ValueError(f"struct {name}: cannot read the field line {line.strip()!r}")
            kind = "pointer" if m.group("ptr") or "*" in m.group("names") else m.group("type")
            if kind not in _KINDS:
                raise ValueError(f"struct {name}: field type {m.group('type')!r} is not supported")
            for field in m.group("names").replace("*", "").split(","):
                kinds.append((field.strip(), kind))
        layout, offset, align = "<", 0, 1
        offsets = {}
        for field, kind in kinds:
            char, size = _KINDS[kind]
            pad = -offset % size
            layout += "x" * pad + char
            offsets[field] = offset + pad
            offset += pad + size
            align = max(align, size)
        layout += "x" * (-offset % align)
        self.fields = tuple(field for field, _ in kinds)
        self.offsets = offsets
        self._struct = struct.Struct(layout)
        self.size = self._struct.size
        self.pack = self._packer()

    def _packer(self) -> Callable[..., bytes]:
        # A function with one keyword-only parameter per field: packing by name at the
        # cost of a positional call.
        names = ", ".join(self.fields)
        namespace = {"_pack": self._struct.pack}
        exec(f"def pack(*, {names}):\n    return _pack({names})\n", namespace)
        return namespace["pack"]
