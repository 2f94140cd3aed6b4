"""Images from wherever a prompt names them: PIL images, bytes, paths, file://, data: and
http(s) URLs. Remote URLs are fetched only from the domains the user allowed; nothing else ever
reaches the network."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
import urllib.request
from typing import Any

from enginehouse.errors import RequestError

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
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise RequestError(f"could not read the image file {_describe(path)}: {e}") from None


def image_bytes(source: str, allowed_domains: list[str]) -> bytes:
    """The encoded image a string names: a data URL, a URL, or a local path."""
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme == "data":
        return _data_url(source)
    if scheme in ("http", "https"):
        return _fetch(source, allowed_domains)
    if scheme == "file":
        return _read_file(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if len(scheme) > 1:  # not a Windows drive letter
        raise RequestError(
            f"images can be given as a path, file://, data: or http(s) URL; {scheme}:// is "
            "not supported"
        )
    return _read_file(source)


def load_image(source: Any, allowed_domains: list[str]) -> Any:
    """A decoded RGB `PIL.Image` from `source`, or a `RequestError` that names what failed."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            data = image_bytes(os.fspath(source), allowed_domains)
        else:
            raise RequestError(
                f"an image must be a PIL image, bytes, a path or a URL; got {type(source).__name__}"
            )
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a truncated file fails here, not inside the processor
        except Exception as e:
            raise RequestError(
                f"the image {_describe(source)} could not be decoded "
                f"({type(e).__name__}: {e}); send a PNG, JPEG, WebP or GIF file"
            ) from None
    return image.convert("RGB")


def image_hash(image: Any) -> str:
    """A digest of the decoded pixels: the same picture from two sources hashes the same."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]
