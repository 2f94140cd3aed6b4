"""The kit's models: the small random-weight ones `enginehouse.testing` builds, one per family,
and which of them a backend claims.

Whether a backend claims a family is asked of its probe on the family's config.json alone (no
weights written yet: a probe must not read weights), so that only the families it claims are
built. The real probe, on the built folder, then has the last word.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..backends import choose_backend, probe_backends
from ..config import EngineConfig
from ..detect import detect_architecture
from ..errors import BackendError
from ..plugins import PluginHost
from ..spec import ModelSpec, read_model_spec
from ..testing import build_model, build_tokenizer, native_model_configs, transformers_model_configs

VOCAB = 512


def builtin_configs() -> dict[str, Any]:
    """Every built-in small model's config by family, natively run families first (the
    first one a backend claims is the one its contract is checked on)."""
    return {**native_model_configs(VOCAB), **transformers_model_configs(VOCAB)}


def verdict(backend: str, spec: ModelSpec, config: EngineConfig, plugins: PluginHost) -> str | None:
    """None when `backend` can run `spec`, else its reason (or the chooser's error)."""
    try:
        choose_backend(probe_backends(spec, config, plugins), backend, plugins.problems())
    except BackendError as e:
        return str(e)
    return None


class ModelStore:
    """Builds the kit's models under `root`, all sharing one trained tokenizer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs = builtin_configs()
        self._tokenizer: Any = None

    def claimed(
        self, backend: str, config: EngineConfig, plugins: PluginHost, families: list[str]
    ) -> dict[str, str | None]:
        """{family: None if the backend's probe takes its config, else the reason}."""
        specs = {f: self._config_spec(f, plugins) for f in families}
        return {f: verdict(backend, spec, config, plugins) for f, spec in specs.items()}

    def _config_spec(self, family: str, plugins: PluginHost) -> ModelSpec:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        folder = self.root / "configs" / family
        config = copy.deepcopy(self.configs[family])
        # What save_pretrained of the model would write: the class transformers builds.
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(folder)
        spec = detect_architecture(read_model_spec(folder), plugins)
        # As the built folder will be: one safetensors file (its size does not matter here).
        return dataclasses.replace(spec, weight_files=("model.safetensors",), weight_bytes=1)

    def build(self, family: str) -> Path:
        folder = self.root / family
        if not (folder / "config.json").exists():
            if self._tokenizer is None:
                self._tokenizer = build_tokenizer(self.root / "tokenizer", VOCAB)
            build_model(folder, self.configs[family], tokenizer=self._tokenizer)
        return folder
