"""Streaming a safetensors checkpoint into a model, tensor by tensor: what every loader shares.

Loaders (the native backend's, the vision encoder's) decide where each checkpoint tensor goes;
this module reads the files (memory-mapped, one tensor at a time, with a progress bar counting
bytes) and words the errors: a file that cannot be read, a tensor whose shape disagrees with
config.json, weights the model needs that no file holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .errors import InvalidModelError

# (file, tensor name, a function that reads the tensor and counts its bytes on the bar)
Entry = tuple[Path, str, Callable[..., torch.Tensor]]
# (dim, begin, end): a slice of a tensor to read instead of all of it (a tensor-parallel rank's)
Part = tuple[int, int, int]


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A file safetensors cannot read (truncated, not safetensors) as our error naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise InvalidModelError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or "
            "corrupt: download it again"
        ) from e


def tensors(files: Iterable[Path], progress: bool = True, desc: str = "Loading weights"):
    """Every tensor of `files`, file after file; read one only by calling its entry's loader
    (with a `Part`, only that slice of it)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = list(files)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for path in files:
            start = bar.n
            with _readable(path), safe_open(str(path), framework="pt") as f:
                for name in f.keys():

                    def read(part: Part | None = None, name: str = name) -> torch.Tensor:
                        tensor = f.get_tensor(name) if part is None else _slice(f, name, part)
                        bar.update(tensor.nbytes)
                        return tensor

                    yield path, name, read
            bar.update(start + path.stat().st_size - bar.n)  # the file's header and skips


def _slice(f, name: str, part: Part) -> torch.Tensor:
    """Read only rows (or columns, ...) begin:end along dim of a stored tensor."""
    dim, begin, end = part
    return f.get_slice(name)[(slice(None),) * dim + (slice(begin, end),)]


def copy_checked(dest: torch.Tensor, tensor: torch.Tensor, name: str, path: Path) -> None:
    """Copy a checkpoint tensor into its place, refusing one whose shape disagrees."""
    if tensor.shape != dest.shape:
        raise InvalidModelError(
            f"{name} in {path.name} has shape {tuple(tensor.shape)}, the model expects "
            f"{tuple(dest.shape)} from config.json; the checkpoint and its config disagree"
        )
    with torch.no_grad():
        dest.copy_(tensor)


def missing_weights(what: str, missing: list[str], hint: str = "") -> InvalidModelError:
    """The error for weights the model needs that the checkpoint lacks (`missing` non-empty)."""
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return InvalidModelError(
        f"the checkpoint lacks {what}: {missing[0]}{hint}{more}; is it complete (every shard "
        "downloaded) and does config.json describe it?"
    )
