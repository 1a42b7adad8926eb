"""What the Python contract tests share (tests/openai_sdk_test.py, tests/gateway_test.py): PNG
bytes read and written by hand, and the loop that runs named tests and reports them.

The scripts are run as `python tests/NAME.py`, so this folder is on their import path.
"""

import struct
import traceback
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def rgba_png(width: int, height: int, pixel) -> bytes:
    """An RGBA PNG whose pixel at (x, y) is pixel(x, y), four bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def mask_png(width: int, height: int, alpha) -> bytes:
    """A black RGBA PNG whose alpha at (x, y) is alpha(x, y): an OpenAI edit mask."""
    return rgba_png(width, height, lambda x, y: (0, 0, 0, alpha(x, y)))


def run(tests, label: str) -> int:
    """Runs each (name, fn), printing `ok` or `FAILED` with the traceback, then a summary line
    under `label`; the exit status: 1 if any failed."""
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"ok     {name}")
        except Exception:
            failed += 1
            print(f"FAILED {name}")
            traceback.print_exc()
    print(f"{label}: {len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0
