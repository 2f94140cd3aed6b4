"""Images the server reads itself: files that clients name by `file://` URL, read only from
one folder, and what it fetched over http(s), checked to be an image at all.

A path is resolved once (every symlink followed), checked to lie under the folder, and that
same resolved path is opened, without following a symlink, and read only if it is a regular
file: no `~` expansion, no second interpretation of the URL between the check and the read,
no device or pipe. Every refusal reads the same, so that the answer does not tell a client
whether a file exists outside the folder.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import bad_request

MAX_FILE_BYTES = 50 * 2**20  # as an image fetched over http(s) (enginehouse_vision.images)


def _refused(url: str):
    return bad_request(
        f"image URL {url[:60]!r} names no image file this server may read: file:// URLs must "
        "be absolute paths of regular files under the server's --allowed-local-media-path",
        "messages",
    )


def _path(url: str) -> str | None:
    """The absolute local path a file: URL names, or None (another host, a relative path)."""
    parts = urllib.parse.urlparse(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        return None
    path = urllib.request.url2pathname(parts.path)
    return path if path.startswith("/") and "\0" not in path else None


def check_file_url(url: str, root: Path | None) -> None:
    """Refuse at once a file: URL that could never be read (no folder, not an absolute path)."""
    if root is None or _path(url) is None:
        raise _refused(url)


def read_file_url(url: str, root: Path) -> bytes:
    """The bytes of the regular file that `url` names under `root` (a resolved folder)."""
    path = _path(url)
    if path is None:
        raise _refused(url)
    resolved = os.path.realpath(path)
    if not Path(resolved).is_relative_to(root):
        raise _refused(url)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError:
        raise _refused(url) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _refused(url)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise bad_request(f"the image file {url[:60]!r} is larger than 50 MiB", "messages")
    return data


# The first bytes of the formats Pillow decodes for the supported models' processors.
_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


def looks_like_an_image(data: bytes) -> bool:
    """`data` starts as an image file does (PNG, JPEG, GIF, WebP, BMP, TIFF)."""
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
