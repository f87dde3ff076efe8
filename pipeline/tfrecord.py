"""TFRecord framing: read and write the record envelope TensorFlow uses, with CRC32C checks and byte offsets.

Each record on disk is::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

Working on plain binary file objects (local files, fsspec/GCS files, BytesIO) keeps TensorFlow out of the
readers and lets a damaged file be reported precisely: which byte, which check, and whether the records after
it can still be trusted.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterable, Iterator, Literal

from pipeline.errors import TFRecordCorruption

try:
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - exercised through _crc32c_python in the tests
    _google_crc32c = None

HEADER_BYTES = 12  # length (8) + its crc (4)
FOOTER_BYTES = 4
_MASK_DELTA = 0xA282EAD8
_READ_CHUNK = 16 << 20  # never ask a file for more than this at once: a garbage length must not allocate it


def _make_crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli polynomial, reflected
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def _crc32c_python(data: bytes) -> int:
    """Table-driven CRC32C; slow, used only when the google-crc32c package is missing."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` as an unsigned int."""
    if _google_crc32c is not None:
        return _google_crc32c.value(bytes(data))
    return _crc32c_python(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC TFRecord stores: rotate right by 15 bits, add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One complete TFRecord frame (header, payload, footer) around ``payload``."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + bytes(payload)
            + struct.pack("<I", masked_crc32c(payload)))


def write_records(fileobj: BinaryIO, payloads: Iterable[bytes]) -> int:
    """Write each payload as one TFRecord frame to the binary file object; returns how many were written."""
    n = 0
    for payload in payloads:
        fileobj.write(frame_record(payload))
        n += 1
    return n


def _read_exact(fileobj: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at end of file."""
    if n <= _READ_CHUNK:
        data = fileobj.read(n)
        if len(data) == n or not data:
            return data
        parts, have = [data], len(data)
    else:
        parts, have = [], 0
    while have < n:
        chunk = fileobj.read(min(n - have, _READ_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def iter_records(fileobj: BinaryIO, verify: bool = True, on_error: Literal["raise", "yield"] = "raise",
                 source: str = "") -> Iterator[tuple[int, bytes] | TFRecordCorruption]:
    """Yield ``(offset, payload)`` for every record of a TFRecord stream, ``offset`` being its header's byte.

    Args:
        fileobj: binary file object positioned at the first record (anything with ``read(n)``).
        verify: check both CRCs; without it only truncation is detected.
        on_error: "raise" raises the first ``TFRecordCorruption``; "yield" yields it instead. After a bad data
            CRC the length was intact, so reading resumes at the next record; after a bad length CRC or a
            truncated record nothing further can be located, so the stream ends.
        source: file name used in error messages.
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
    offset = 0
    while True:
        header = _read_exact(fileobj, HEADER_BYTES)
        if not header:
            return
        error = None
        if len(header) < HEADER_BYTES:
            error = TFRecordCorruption("truncated", offset,
                                       f"file ends inside a record header ({len(header)} of 12 bytes)", source)
        else:
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            length = struct.unpack("<Q", length_bytes)[0]
            if verify and masked_crc32c(length_bytes) != length_crc:
                error = TFRecordCorruption("bad_length_crc", offset,
                                           "length field fails its CRC; the rest of the file cannot be located",
                                           source)
        if error is None:
            body = _read_exact(fileobj, length + FOOTER_BYTES)
            if len(body) < length + FOOTER_BYTES:
                error = TFRecordCorruption(
                    "truncated", offset,
                    f"file ends inside a record: {len(body)} of {length + FOOTER_BYTES} bytes after the header",
                    source)
            else:
                payload = body[:length]
                if verify and masked_crc32c(payload) != struct.unpack("<I", body[length:])[0]:
                    corrupt = TFRecordCorruption("bad_data_crc", offset,
                                                 f"payload of {length} bytes fails its CRC", source)
                    if on_error == "raise":
                        raise corrupt
                    yield corrupt
                else:
                    yield offset, payload
                offset += HEADER_BYTES + length + FOOTER_BYTES
                continue
        if on_error == "raise":
            raise error
        yield error
        return


def read_records(path: str, verify: bool = True, on_error: Literal["raise", "yield"] = "raise"
                 ) -> Iterator[tuple[int, bytes] | TFRecordCorruption]:
    """``iter_records`` over a local path or fsspec URL (``gs://...``), closing the file afterwards."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        yield from iter_records(f, verify=verify, on_error=on_error, source=path)
