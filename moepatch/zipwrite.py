"""A zip writer for reproducible archives that never recompresses what it copies.

Members are either new bytes, stored (so the archive's bytes depend on no zlib
build), or compressed data copied as it is from another archive (fast: a
336 MB wheel is rewritten in about a second). Every member gets the same
timestamp, 1980-01-01 00:00:00, and the order is the caller's. ZIP64 is left
out: an archive that would need it raises zipfile.LargeZipFile; a member that
cannot be copied raises zipfile.BadZipFile.
"""

import stat
import struct
import zipfile

_DOS_DATE = (1 << 5) | 1  # 1980-01-01, the zip epoch; time 00:00:00
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")
_LIMIT = 0xFFFFFFFF  # beyond this a zip needs ZIP64, which this writer leaves out


class ZipWriter:
    """A zip writer whose members are either new bytes (stored) or raw copies."""

    def __init__(self, out) -> None:
        self.out = out
        self.central: list[bytes] = []

    def _header(self, name: str, method: int, flags: int, crc: int, size: int, usize: int, mode):
        encoded = name.encode("utf-8")
        flags |= 0x800 if not name.isascii() else 0  # UTF-8 name
        offset = self.out.tell()
        if max(offset, size, usize) > _LIMIT or len(self.central) >= 0xFFFF:
            raise zipfile.LargeZipFile("the archive would need ZIP64, which this writer leaves out")
        fixed = (20, flags, method, 0, _DOS_DATE, crc, size, usize, len(encoded))
        self.out.write(_LOCAL.pack(b"PK\x03\x04", *fixed, 0) + encoded)
        attr = (stat.S_IFREG | (mode & 0o777 or 0o644)) << 16
        made_by = (3 << 8) | 20  # Unix, zip 2.0
        central = _CENTRAL.pack(b"PK\x01\x02", made_by, *fixed, 0, 0, 0, 0, attr, offset)
        self.central.append(central + encoded)

    def add(self, name: str, data: bytes, mode: int) -> None:
        self._header(name, zipfile.ZIP_STORED, 0, zipfile.crc32(data), len(data), len(data), mode)
        self.out.write(data)

    def copy(self, src, info: zipfile.ZipInfo, name: str) -> None:
        """Copy `info`'s compressed bytes from the open archive `src`, unchanged."""
        if info.flag_bits & 0x1:
            raise zipfile.BadZipFile(f"{info.filename}: encrypted member")
        src.seek(info.header_offset)
        local = src.read(_LOCAL.size)
        if local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"{info.filename}: bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        src.seek(info.header_offset + _LOCAL.size + name_len + extra_len)
        flags = info.flag_bits & 0x6  # the deflate level bits; sizes are in the header
        mode = info.external_attr >> 16
        self._header(
            name, info.compress_type, flags, info.CRC, info.compress_size, info.file_size, mode
        )
        left = info.compress_size
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise zipfile.BadZipFile(f"{info.filename}: truncated")
            self.out.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        start = self.out.tell()
        for entry in self.central:
            self.out.write(entry)
        size, count = self.out.tell() - start, len(self.central)
        self.out.write(_END.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))
