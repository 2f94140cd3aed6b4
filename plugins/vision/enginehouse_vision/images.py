"""Images from wherever a prompt names them: PIL images, bytes, paths, file://, data: and
http(s) URLs. Remote URLs are fetched only from the domains the user allowed; nothing else ever
reaches the network.

Loading is two steps, so that a prompt's images are checked before any is decoded: `open_images`
reads each image's header (its size) and holds the prompt to its pixel budget, and
`decode_image` then decodes one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import urllib.parse
import urllib.request
from typing import Any

from enginehouse.plugin_api import RequestError

MAX_DOWNLOAD_BYTES = 50 * 2**20
FETCH_TIMEOUT_S = 10.0


def _describe(source: Any) -> str:
    text = str(source)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def domain_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is an allowed domain or a subdomain of one."""
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


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


def _check_domain(url: str, allowed: list[str]) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    if not domain_allowed(host, allowed):
        raise RequestError(
            f"fetching images from {host!r} is not allowed; allow the domain with "
            "EngineConfig(allowed_media_domains=[...]) or --allowed-media-domains, or send the "
            "image inline as a data: URL"
        )


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed domain: an allowed host must not be a way out."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        # urllib itself would follow a redirect to ftp://; only http(s) is an image source.
        scheme = urllib.parse.urlparse(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise RequestError(
                f"the image URL {_describe(req.full_url)} redirects to a {scheme or 'relative'}: "
                "URL; only redirects to http(s) URLs are followed"
            )
        _check_domain(newurl, self.allowed)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, allowed: list[str]) -> bytes:
    _check_domain(url, allowed)
    opener = urllib.request.build_opener(_AllowedRedirects(allowed))
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as e:
        raise RequestError(f"could not fetch the image {_describe(url)}: {e}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise RequestError(f"the image at {_describe(url)} is larger than 50 MiB")
    return data


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


def image_bytes(source: str, allowed_domains: list[str]) -> bytes:
    """The encoded image a string names: a data URL, a URL, or a local path."""
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme == "data":
        return _data_url(source)
    if scheme in ("http", "https"):
        return _fetch(source, allowed_domains)
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


def open_image(source: Any, allowed_domains: list[str]) -> Any:
    """A `PIL.Image` from `source` with only its header read (its size is known, its pixels
    not yet decoded), or a `RequestError` that names what failed."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = image_bytes(os.fspath(source), allowed_domains)
    else:
        raise RequestError(
            f"an image must be a PIL image, bytes, a path or a URL; got {type(source).__name__}"
        )
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow's own decompression-bomb check included
        raise _undecodable(source, e) from None


def open_images(sources: list[Any], allowed_domains: list[str], max_pixels: int) -> list[Any]:
    """`open_image` of each source, stopping at the first that takes the prompt's images past
    `max_pixels` (width x height, all images together)."""
    images, pixels = [], 0
    for i, source in enumerate(sources):
        image = open_image(source, allowed_domains)
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


def decode_image(image: Any, source: Any) -> Any:
    """The opened `image` decoded, in RGB; a truncated file fails here, not in the processor."""
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:
        raise _undecodable(source, e) from None


def image_hash(image: Any) -> str:
    """A digest of the decoded pixels: the same picture from two sources hashes the same."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]
