"""Step 1 of `pipeline()`: turn a model identifier into a local folder."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError

# What a model needs at run time; skips other formats (gguf, onnx, flax, original checkpoints).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    revision: str | None = None
    from_hub: bool = False


def _looks_like_path(identifier: str) -> bool:
    # A hub id is "name" or "org/name"; anything else (./x, a/b/c, ~/x) is meant as a folder.
    return identifier.startswith((".", "/", "~")) or not HUB_ID.match(identifier)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model(
    model: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """A local folder is used as it is; anything else is a hub id fetched (or found in the cache).

    Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable) the hub cache alone is used, and a
    model that is not there is a clear `ModelNotFoundError`.
    """
    identifier = os.fspath(model)
    path = Path(identifier).expanduser()
    if path.is_dir():
        return ResolvedModel(model_id=identifier, path=path.resolve(), revision=revision)
    if path.exists():
        raise ModelNotFoundError(f"{identifier} is a file; give the model folder that holds it")
    if _looks_like_path(identifier):
        raise ModelNotFoundError(_no_folder(identifier))
    return ResolvedModel(identifier, _download(identifier, revision, cache_dir), revision, True)


def _no_folder(identifier: str) -> str:
    return (
        f"model folder {identifier!r} does not exist; check the path, or give a hub id "
        "like 'Qwen/Qwen2.5-0.5B-Instruct'"
    )


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    try:
        # snapshot_download shows a tqdm progress bar per file while it downloads.
        return Path(snapshot_download(repo_id, local_files_only=_offline(), **kwargs))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        if "/" not in repo_id:  # a bare name was more likely meant as a folder
            raise ModelNotFoundError(f"{_no_folder(repo_id)} (nor is it a hub repo)") from e
        raise ModelNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is not on the hub or is private: {e}. "
            "Check the spelling, or log in with `hf auth login` for gated models"
        ) from e
    except LocalEntryNotFoundError as e:
        if "/" not in repo_id:
            # Hub ids are "org/name"; a bare name that is not cached is most likely a folder
            # name with a typo, so say that rather than suggesting a download.
            raise ModelNotFoundError(
                f"{_no_folder(repo_id)}; a bare name is also looked up in the local hub cache, "
                "where it is not either"
            ) from e
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or "the Hugging Face cache"
        what = f"{repo_id!r} at revision {revision!r}" if revision else repr(repo_id)
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ModelNotFoundError(
            f"{what} is not in the local cache ({where}) and the hub cannot be reached "
            f"(offline mode or no network). Download it where there is a network "
            f"(`{download}`) and copy the cache, or pass a local model folder"
        ) from e
