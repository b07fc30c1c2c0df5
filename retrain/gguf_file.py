"""Read a GGUF file's header (metadata and tensor list) fast, without touching the tensors.

gguf.GGUFReader builds a numpy view per string: ~13 s for the embedded model's 98k tokenizer
strings on a busy 2-core machine; this reads the same header with struct in a fraction of it.
Export copies the header into the files it writes; the registry and the pipeline read the quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class GGUFFileError(ValueError):
    """A GGUF file is missing, not a GGUF, or corrupt; the message says which file and what to do."""


@dataclass
class GGUFTensor:
    """One tensor entry of a GGUF header: name, numpy-order shape, ggml type, offset in the data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (in file order, raw: strings as bytes) and tensor list.

    gguf.GGUFReader builds a numpy view per string: ~13 s for the embedded model's 98k tokenizer
    strings on a busy 2-core machine; this reads the same header with struct in a fraction of it.
    """

    path: Path
    metadata: dict[str, tuple]  # key -> (value, GGUFValueType, sub type of an array or None)
    tensors: list[GGUFTensor]
    data_offset: int

    def get(self, key: str, default=None):
        """The plain value of ``key``: strings decoded, arrays as lists."""
        if key not in self.metadata:
            return default
        value = self.metadata[key][0]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode("utf-8", errors="replace") for v in value]
        return value


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf(path: Path, error: type[Exception] = GGUFFileError) -> GGUFHeader:
    """The header of the GGUF at ``path``; raises ``error`` when it is missing, not a GGUF, or cut short."""
    import mmap
    import struct

    import numpy as np
    from gguf import GGUFValueType

    path = Path(path)
    if not path.is_file():
        raise error(f"GGUF {str(path)!r} does not exist: pass the GGUF file the app serves")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise error(
                f"{str(path)!r} is not a GGUF (it starts with {magic!r}, not b'GGUF'): pass the .gguf "
                "file the app serves; its metadata and tensor names are copied"
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 4

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise struct.error("a string runs past the end of the file")
        pos += n
        return buf[pos - n : pos]

    def value(vtype: int):
        if vtype == _STRING:
            return string()
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        raise struct.error(f"unknown metadata value type {vtype}")

    def array(sub_type: int, n: int) -> list:
        nonlocal pos
        if sub_type in _SCALARS and sub_type != 7:  # numbers: all at once
            dtype = np.dtype(_SCALARS[sub_type])
            items = np.frombuffer(buf, dtype, n, pos).tolist()
            pos += n * dtype.itemsize
            return items
        if sub_type != _STRING:
            return [value(sub_type) for _ in range(n)]
        # Tokenizer vocabularies and merges: ~100k strings, read in one tight loop.
        items, at, size, unpack = [], pos, len(buf), struct.Struct("<Q").unpack_from
        for _ in range(n):
            m = unpack(buf, at)[0]
            at += 8
            if at + m > size:
                raise struct.error("a string runs past the end of the file")
            items.append(buf[at : at + m])
            at += m
        pos = at
        return items

    try:
        version = take("<I")
        if version & 0xFFFF == 0:
            raise error(f"{str(path)!r} is a big-endian GGUF: only little-endian files are supported")
        if version < 2:
            raise error(f"{str(path)!r} is GGUF version {version}: convert it to version 3 first")
        n_tensors, n_kv = take("<Q"), take("<Q")
        metadata: dict[str, tuple] = {}
        for _ in range(n_kv):
            key = string().decode("utf-8")
            vtype = take("<I")
            if vtype == _ARRAY:
                sub_type, n = take("<I"), take("<Q")
                if sub_type == _ARRAY:
                    raise error(f"{str(path)!r}: metadata key {key!r} is an array of arrays, which "
                                      "this exporter cannot copy")
                metadata[key] = (array(sub_type, n), GGUFValueType(vtype), GGUFValueType(sub_type))
            else:
                metadata[key] = (value(vtype), GGUFValueType(vtype), None)
        tensors = []
        for _ in range(n_tensors):
            name = string().decode("utf-8")
            dims = [take("<Q") for _ in range(take("<I"))]
            tensors.append(GGUFTensor(name, tuple(reversed(dims)), take("<I"), take("<Q")))
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise error(f"{str(path)!r} is cut short or corrupt ({err}): download it again") from err
    finally:
        buf.close()
    alignment = int(metadata.get("general.alignment", (32,))[0])
    return GGUFHeader(path, metadata, tensors, -(-pos // alignment) * alignment)


def quant_name(path: Path, error: type[Exception] = GGUFFileError) -> str:
    """The quantization of a GGUF (Q4_1, Q8_0, F16, ...) from general.file_type, named as the app names it."""
    from space.model import FILE_TYPES

    file_type = read_gguf(path, error).get("general.file_type")
    if file_type is None:
        return "unknown"
    return FILE_TYPES.get(int(file_type), f"type{int(file_type)}")
