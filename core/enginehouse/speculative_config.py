"""`EngineConfig(speculative_config=...)`: speculative decoding's settings, in vLLM's words.

`{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": a,
"prompt_lookup_max": b}` proposes tokens copied from the sequence's own earlier tokens;
`{"method": "draft_model", "model": PATH_OR_ID, "num_speculative_tokens": K}` runs a small
model that shares the target's tokenizer; `{"method": "eagle3" | "eagle", "model": HEAD}` a
draft head (EAGLE-3 or EAGLE) trained for the target, run on its hidden states; `{"method":
"mtp"}` the target checkpoint's own multi-token prediction layer (DeepSeek-V3). The command
line takes the same as JSON (`--speculative-config '{"method": "ngram", ...}'`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# vLLM's n-gram window when neither end is given.
DEFAULT_PROMPT_LOOKUP = 5
METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp")
# Methods whose proposals come from a head on the target's hidden states, run by the runner
# (RunnerCapabilities.drafts_tokens).
HEAD_METHODS = ("eagle", "eagle3", "mtp")


class SpeculativeConfig(BaseModel):
    """Which proposer drafts tokens and how many; the target model verifies them all in one
    forward pass, so the output is the one decoding without speculation gives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft_model", "eagle", "eagle3", "mtp"] | None = Field(
        None, description="'ngram' (prompt lookup), 'draft_model', 'eagle3' / 'eagle' (a draft "
        "head) or 'mtp' (the target's MTP layer); 'draft_model' when only a model is given"
    )  # fmt: skip
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=32, description="tokens proposed per step (K); the target checks K + 1"
    )
    prompt_lookup_min: int | None = Field(None, ge=1, description="ngram: shortest match")
    prompt_lookup_max: int | None = Field(None, ge=1, description="ngram: longest match")
    model: str | None = Field(
        None, description="draft_model: a local folder or a hub id; eagle/eagle3: the head's folder"
    )
    revision: str | None = Field(None, description="draft_model: the hub revision")

    @model_validator(mode="after")
    def _complete(self) -> SpeculativeConfig:
        method = self.method or ("draft_model" if self.model else None)
        if method is None:
            raise ValueError(
                "say which proposer: 'method': 'ngram' (prompt lookup) or 'draft_model' "
                "(with 'model': a small model sharing the target's tokenizer)"
            )
        if method == "mtp" and self.num_speculative_tokens is None:
            object.__setattr__(self, "num_speculative_tokens", 1)  # vLLM's: one MTP layer
        if self.num_speculative_tokens is None:
            raise ValueError(f"method {method!r} needs 'num_speculative_tokens' (e.g. 3)")
        if method == "draft_model" and not self.model:
            raise ValueError("method 'draft_model' needs 'model': the draft's folder or hub id")
        if method in ("eagle", "eagle3") and not self.model:
            raise ValueError(
                f"method {method!r} needs 'model': the folder of a draft head trained for the "
                "target (its config.json and *.safetensors)"
            )
        if method == "mtp" and self.model:
            raise ValueError(
                "method 'mtp' takes no 'model': it runs the target checkpoint's own MTP layer"
            )
        if method == "ngram":
            if self.model:
                raise ValueError("method 'ngram' takes no 'model'; use 'draft_model' for one")
            low = self.prompt_lookup_min or self.prompt_lookup_max or DEFAULT_PROMPT_LOOKUP
            high = self.prompt_lookup_max or self.prompt_lookup_min or DEFAULT_PROMPT_LOOKUP
            if low > high:
                raise ValueError(
                    f"prompt_lookup_min ({low}) is larger than prompt_lookup_max ({high})"
                )
            object.__setattr__(self, "prompt_lookup_min", low)
            object.__setattr__(self, "prompt_lookup_max", high)
        elif self.prompt_lookup_min or self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min/max are for method 'ngram' only")
        object.__setattr__(self, "method", method)
        return self

    @property
    def k(self) -> int:
        """The number of tokens proposed per step."""
        return int(self.num_speculative_tokens or 0)

    @classmethod
    def parse(cls, value: Any) -> Any:
        """A JSON string (the command line) becomes a dict; anything else is left as it is."""
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"speculative_config must be JSON such as "
                    f'\'{{"method": "ngram", "num_speculative_tokens": 3}}\' ({e})'
                ) from None
        return value
