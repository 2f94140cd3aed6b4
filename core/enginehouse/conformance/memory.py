"""How much tensor memory a runner holds: the bytes of every torch tensor and numpy array
reachable from it, each storage counted once.

The kit cannot ask a runner what it allocated, so it looks: `allocate_kv` should add about
`num_blocks * kv_spec.bytes_per_block`, serving requests should not keep adding, and `close`
should let go of nearly all of it. Memory a foreign runtime holds outside torch and numpy (an
ONNX Runtime session's weights, say) is invisible here.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch

# Objects the walk never enters: they are code or type objects, not data a runner owns.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes)
MAX_OBJECTS = 200_000  # a bound on the walk, far above what any runner holds


def reachable_bytes(root: object) -> int:
    """Bytes of the distinct tensor and array storages reachable from `root`."""
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack and len(seen) < MAX_OBJECTS:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE) or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _add_tensor(obj, storages)
            continue
        if _is_ndarray(obj):
            base = obj if obj.base is None else obj.base
            storages[("numpy", id(base))] = getattr(base, "nbytes", obj.nbytes)
            continue
        stack.extend(_children(obj))
    return sum(storages.values())


def _add_tensor(t: torch.Tensor, storages: dict[tuple[str, int], int]) -> None:
    if t.device.type == "meta":
        return
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: count the elements
        storages[("tensor", id(t))] = t.numel() * t.element_size()
        return
    storages[(str(t.device), storage.data_ptr() or id(t))] = storage.nbytes()


def _is_ndarray(obj: object) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "nbytes") and hasattr(obj, "base")


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, (int, float, bool, complex)):
        return []
    kids = list(getattr(obj, "__dict__", {}).values())
    for name in getattr(type(obj), "__slots__", ()):
        kids.append(getattr(obj, name, None))
    return kids
