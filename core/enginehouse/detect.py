"""Step 3 of `pipeline()`: ask every plugin what the model is and merge the answers."""

from __future__ import annotations

import logging
from typing import Any

from .contract import deprecated
from .plugins import PluginHost
from .spec import ModelSpec

log = logging.getLogger(__name__)


def detect_architecture(spec: ModelSpec, plugins: PluginHost) -> ModelSpec:
    """Return `spec` with `facts` merged from every plugin; the first plugin called wins a key."""
    facts: dict[str, Any] = {}
    for plugin, result in plugins.call_each("detect_architecture", spec=spec):
        if isinstance(result, Exception):
            log.warning("plugin %s failed to inspect the model: %s", plugin, result)
        elif result:
            if result.get("native_impl") is not None:
                deprecated(
                    f"the native_impl fact (plugin {plugin!r})",
                    "the register_model_families hook (docs/plugins.md, 'Add a model family')",
                    since="1.0",
                    removed_in="1.1",
                )
            for key, value in result.items():
                if value is not None:
                    facts.setdefault(key, value)
    return spec.with_facts(facts)
