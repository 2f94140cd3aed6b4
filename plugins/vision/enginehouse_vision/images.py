"""Images from wherever a prompt names them: PIL images, bytes, paths, file://, data: and
http(s) URLs. Remote URLs are fetched (`enginehouse.image_fetch`) only from the domains the
user allowed, only from public addresses unless allowed too, within a deadline per image and
one per prompt; nothing else ever reaches the network.

Loading is two steps, so that a prompt's images are checked before any is decoded: `open_images`
reads each image's header (its size) and holds the prompt to its pixel budget, and
`decode_image` then decodes one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import stat
import time
import urllib.parse
import urllib.request
from typing import Any

from enginehouse.plugin_api import MAX_DOWNLOAD_BYTES, FetchPolicy, RequestError, fetch_failed

# A decoded image is reduced to this many pixels (4096 x 4096, 48 MiB in RGB): more than any
# supported processor uses (Qwen2-VL's max_pixels is 3584 x 3584; LLaVA's tiles far fewer).
MAX_DECODED_PIXELS = 4096 * 4096


def _describe(source: Any) -> str:
    text = str(source)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(
            f"the data URL {_describe(url)} is not base64 encoded; use "
            "'data:image/png;base64,<payload>'"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"the data URL {_describe(url)} has invalid base64: {e}") from None


def _read_file(path: str) -> bytes:
    """A regular file's bytes (up to the download limit): a device such as /dev/zero, or a
    pipe, is refused rather than read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RequestError(f"the image file {_describe(path)} is not a regular file")
            data = f.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as e:
        raise RequestError(f"could not read the image file {_describe(path)}: {e}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise RequestError(f"the image file {_describe(path)} is larger than 50 MiB")
    return data


def image_bytes(source: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """The encoded image a string names: a data URL, a URL (fetched as `policy` allows, before
    `deadline`), or a local path."""
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme == "data":
        return _data_url(source)
    if scheme in ("http", "https"):
        return policy.fetch(source, deadline)
    if scheme == "file":  # the path as written: `~` is expanded in plain paths only
        return _read_file(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if len(scheme) > 1:  # not a Windows drive letter
        raise RequestError(
            f"images can be given as a path, file://, data: or http(s) URL; {scheme}:// is "
            "not supported"
        )
    return _read_file(os.path.expanduser(source))


def _undecodable(source: Any, e: Exception) -> RequestError:
    return RequestError(
        f"the image {_describe(source)} could not be decoded ({type(e).__name__}: {e}); "
        "send a PNG, JPEG, WebP or GIF file"
    )


def open_image(source: Any, policy: FetchPolicy, deadline: float | None = None) -> Any:
    """A `PIL.Image` from `source` with only its header read (its size is known, its pixels
    not yet decoded), or a `RequestError` that names what failed."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = image_bytes(os.fspath(source), policy, deadline)
    else:
        raise RequestError(
            f"an image must be a PIL image, bytes, a path or a URL; got {type(source).__name__}"
        )
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow's own decompression-bomb check included
        if isinstance(source, str) and source.lower().startswith(("http:", "https:")):
            # What was fetched is not an image: the one message of every failed fetch.
            raise fetch_failed(source, policy.timeout) from None
        raise _undecodable(source, e) from None


def open_images(sources: list[Any], policy: FetchPolicy, max_pixels: int) -> list[Any]:
    """`open_image` of each source, stopping at the first that takes the prompt's images past
    `max_pixels` (width x height, all images together). Their downloads share one deadline,
    `policy.total_timeout`."""
    deadline = time.monotonic() + policy.total_timeout
    images, pixels = [], 0
    for i, source in enumerate(sources):
        image = open_image(source, policy, deadline)
        pixels += image.width * image.height
        if pixels > max_pixels:
            raise RequestError(
                f"the prompt's images have more than {max_pixels:,} pixels together (image "
                f"{i + 1} of {len(sources)} is {image.width}x{image.height}); send fewer or "
                "smaller images, or raise EngineConfig(max_image_pixels_per_prompt=...), "
                "--max-image-pixels-per-prompt"
            )
        images.append(image)
    return images


def decode_image(image: Any, source: Any, max_pixels: int = MAX_DECODED_PIXELS) -> Any:
    """The opened `image` decoded, in RGB, and made no larger than `max_pixels` (keeping its
    shape): a processor resizes it to far fewer anyway, and a 13000x13000 GIF of 121 KB would
    otherwise cost 2 GB as it went through RGB, the hash and the processor's float arrays.
    A JPEG is decoded at the reduced size directly (`draft`); other formats are decoded at
    their own size, in their own mode (at most 4 bytes per pixel of the prompt's pixel budget),
    and reduced before anything else is made of them. A truncated file fails here, not in the
    processor."""
    try:
        target = _reduced_size(image.size, max_pixels)
        if target != image.size:
            image.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8; others: no-op
        image.load()
        if image.width * image.height > max_pixels:
            image.thumbnail(_reduced_size(image.size, max_pixels))
        return image.convert("RGB")
    except Exception as e:
        raise _undecodable(source, e) from None


def _reduced_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def image_hash(image: Any) -> str:
    """A digest of the decoded pixels: the same picture from two sources hashes the same."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]
