"""Container framing checks for the formats PyAV decodes, and Ogg: is a file cut short or its header damaged?

In: a seekable file object and its size. Out: a rejection reason (``truncated: …``, ``bad header: …``) or
None. Only the framing is read (a few box/object headers, the last 64 KiB of an Ogg file), so a check
costs a handful of small reads, never a decode. ffmpeg opens many cut files without complaint and
libsndfile reads a cut Ogg file as a shorter one; these checks name what is missing.
"""

from __future__ import annotations

import io
import struct

# ASF header object GUID (75B22630-668E-11CF-A6D9-00AA0062CE6C), as stored on disk.
ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def container_damage(handle: io.IOBase, kind: str, size: int | None) -> str | None:
    """Why a container is cut short or damaged, from its framing alone (a few small reads), else None.

    ``kind``: ``mov`` (MP4 top-level boxes), ``asf`` (the header and data objects), ``matroska`` (the
    Segment element), ``OGG`` (the last page: whole, and marked end-of-stream).
    """
    where = handle.tell()
    try:
        end = size if size is not None else handle.seek(0, io.SEEK_END)
        check = {"mov": _mp4_boxes, "asf": _asf_objects, "matroska": _ebml_segment, "OGG": _ogg_tail}.get(kind)
        return check(handle, end)[0] if check else None
    except (OSError, ValueError, struct.error, IndexError):
        return None  # a framing this walk does not follow: the decoder's own checks stand
    finally:
        handle.seek(where)


def read_at(handle: io.IOBase, pos: int, n: int) -> bytes:
    handle.seek(pos)
    return handle.read(n) or b""


def _mp4_boxes(handle: io.IOBase, end: int) -> tuple[str | None, list[str]]:
    pos, names = 0, []
    while pos + 8 <= end:
        head = read_at(handle, pos, 16)
        box_size, kind = struct.unpack(">I4s", head[:8])
        if box_size == 1 and len(head) >= 16:
            box_size = struct.unpack(">Q", head[8:16])[0]
        elif box_size == 0:
            box_size = end - pos
        if not all(32 <= c < 127 for c in kind) or not 8 <= box_size < _MAX_PLAUSIBLE_BYTES:
            return f"bad header: the MP4 box at byte {pos} is not a valid box", names
        name = kind.decode("ascii")
        if pos + box_size > end:
            return (f"truncated: the MP4 '{name}' box declares {box_size} bytes but the file holds "
                    f"{end - pos} of them"), names
        names.append(name)
        pos += box_size
    return None, names


def mp4_has_no_index(handle: io.IOBase, size: int | None) -> bool:
    try:
        end = size if size is not None else handle.seek(0, io.SEEK_END)
        damage, names = _mp4_boxes(handle, end)
        return damage is None and "moov" not in names
    except (OSError, ValueError, struct.error):
        return False


_ASF_DATA_GUID = bytes.fromhex("3626b2758e66cf11a6d900aa0062ce6c")
_MAX_PLAUSIBLE_BYTES = 1 << 42  # a box or object declaring more than 4 TiB is a damaged header, not a cut file


def _asf_objects(handle: io.IOBase, end: int) -> tuple[str | None, list]:
    pos = 0
    for name, guid in (("header", ASF_GUID), ("data", _ASF_DATA_GUID)):
        head = read_at(handle, pos, 24)
        if len(head) < 24 or head[:16] != guid:
            return None, []
        obj_size = struct.unpack("<Q", head[16:24])[0]
        if not 24 <= obj_size < _MAX_PLAUSIBLE_BYTES:
            return f"bad header: the ASF {name} object declares an implausible size of {obj_size} bytes", []
        if pos + obj_size > end:
            return (f"truncated: the ASF {name} object declares {obj_size} bytes but the file holds "
                    f"{end - pos} of them"), []
        pos += obj_size
    return None, []


def _vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int, bool]:
    """An EBML variable-length integer at ``pos``: (value, bytes used, all value bits set = unknown size)."""
    first = data[pos]
    length = 9 - first.bit_length()
    value = int.from_bytes(data[pos:pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, length, value == (1 << (7 * length)) - 1


def _ebml_segment(handle: io.IOBase, end: int) -> tuple[str | None, list]:
    data = read_at(handle, 0, 64)
    _, id_len, _ = _vint(data, 0, True)
    header_size, size_len, _ = _vint(data, id_len, False)
    pos = id_len + size_len + header_size  # the Segment element follows the EBML header
    data = read_at(handle, pos, 12)
    seg_id, id_len, _ = _vint(data, 0, True)
    if seg_id != 0x18538067:
        return "bad header: no Matroska Segment after the EBML header", []
    seg_size, size_len, unknown = _vint(data, id_len, False)
    body = pos + id_len + size_len
    if not unknown and body + seg_size > end:
        return (f"truncated: the Matroska Segment declares {seg_size} bytes but the file holds "
                f"{end - body} of them"), []
    return None, []


def _ogg_tail(handle: io.IOBase, end: int) -> tuple[str | None, list]:
    tail_start = max(0, end - 65_536)
    tail = read_at(handle, tail_start, end - tail_start)
    at = tail.rfind(b"OggS")
    if at < 0 or len(tail) - at < 27 or tail[at + 4] != 0:
        return None, []
    segments = tail[at + 26]
    lacing = tail[at + 27:at + 27 + segments]
    page_end = at + 27 + segments + sum(lacing)
    if len(lacing) < segments or page_end > len(tail):
        return (f"truncated: the last Ogg page declares {27 + segments + sum(lacing)} bytes but the file "
                f"holds {len(tail) - at} of them"), []
    if not tail[at + 5] & 0x04:
        return "truncated: the Ogg stream ends without its end-of-stream page", []
    return None, []
