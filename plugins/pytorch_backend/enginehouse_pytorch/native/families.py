"""The native backend's registry of model families: its own (`arch.FAMILIES`) and those other
plugins add through the `register_model_families` hook, one lookup for both.

A plugin's family builds on a native one (`ModelFamily.base`): its config is read as the
base's (after `ModelFamily.config`), its switches set over the base's `Arch`, and its
checkpoint names renamed to the base's (`ModelFamily.weight_names`) before the loader maps
them; the model is then the same native decoder, with paged KV, batching, prefix caching
and tensor parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from enginehouse.plugin_api import ModelFamily, registered_families

from .arch import FAMILIES, Arch, UnsupportedModel

BACKEND = "pytorch"


def own_families() -> list[ModelFamily]:
    """The native families, as this plugin registers them (every entry of `FAMILIES`)."""
    return [ModelFamily(name, reader=read, backend=BACKEND) for name, read in FAMILIES.items()]


def native_families() -> dict[str, ModelFamily]:
    """architecture -> family: the native ones, then what other plugins register."""
    found = {f.architecture: f for f in own_families()}
    for architecture, (_, family) in registered_families(BACKEND).items():
        found.setdefault(architecture, family)
    return found


def family_of(architecture: str) -> ModelFamily | None:
    if architecture in FAMILIES:  # the common case: no plugins asked
        return ModelFamily(architecture, reader=FAMILIES[architecture], backend=BACKEND)
    return native_families().get(architecture)


def reader_of(family: ModelFamily) -> Callable[[Mapping[str, Any]], Arch]:
    """config -> Arch for a family: the backend's own reader, or the base's with the family's
    config translation and switches."""
    if family.reader is not None:
        return family.reader
    base = FAMILIES.get(family.base or "")
    if base is None:
        raise UnsupportedModel(
            f"{family.architecture} builds on {family.base!r}, which has no native "
            f"implementation (native: {', '.join(sorted(FAMILIES))})"
        )
    fields = {f.name for f in dataclasses.fields(Arch)}
    unknown = sorted(set(family.switches) - fields)
    if unknown:
        raise UnsupportedModel(
            f"{family.architecture} sets {', '.join(unknown)}, which the native Arch does "
            f"not have (its fields: {', '.join(sorted(fields))})"
        )

    def read(config: Mapping[str, Any]) -> Arch:
        arch = base(family.config(config) if family.config else config)
        name = family.name or arch.family
        return dataclasses.replace(arch, family=name, **family.switches)

    return read


def renamer(architecture: str) -> Callable[[str], str] | None:
    """How the family's checkpoint names become the native ones (None: they already are)."""
    family = family_of(architecture)
    return family.rename if family is not None and family.weight_names else None
