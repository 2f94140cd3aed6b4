"""Step 6 of `pipeline()`: which chat template turns messages into a prompt.

Precedence: an explicit `chat_template=` (a Jinja string or a file) overrides everything; then
the tokenizer's own template; then a processor's `chat_template.json` (vision-language models);
then, only for tokenizers that have none, a small built-in one
chosen by the config's `model_type` (never by the folder's name), with a warning.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidModelError, RequestError
from .spec import ModelSpec
from .tool_calls import template_supports_tools

log = logging.getLogger(__name__)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = (
    "{{ bos_token or '' }}{% for m in messages %}{{ m['role'] | capitalize }}: "
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
BUILTIN = {"chatml": CHATML, "plain": PLAIN}
FAMILY_TEMPLATES = {"qwen2": "chatml", "qwen2_moe": "chatml", "qwen3": "chatml"}


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    source: str  # "override", "tokenizer", "processor" or "builtin:<name>"

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def reads_parts(self, tokenizer: Any) -> bool:
        """Whether the template takes message content as a list of typed parts (the format of
        transformers' VLM templates) rather than as a string."""
        return _reads_parts(self.template, tokenizer)

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders the tools it is given (`tools=`) at all."""
        return template_supports_tools(self.template)

    def render(
        self,
        tokenizer: Any,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        """The prompt's text. `template_kwargs` become variables of the template
        (`enable_thinking`, `reasoning_effort`, ...); one it does not read is ignored."""
        kwargs = check_template_kwargs(template_kwargs, tokenizer)
        if self.is_builtin:
            log.warning(
                "the tokenizer has no chat template; using enginehouse's %r template. "
                "Pass chat_template= (a Jinja string or file) for the model's real format",
                self.source,
            )
        return tokenizer.apply_chat_template(
            [_with_argument_objects(m) for m in messages],
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools or None,
            **kwargs,
        )


def check_template_kwargs(kwargs: Mapping[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    """`kwargs` as template variables; `TemplateKwargsError` for one that is not a template
    variable but an argument of the rendering itself (`tokenize`, `tools`, `messages`, ...),
    which would change what enginehouse asked for rather than reach the template."""
    if not kwargs:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TemplateKwargsError("chat_template_kwargs must be an object of template variables")
    reserved = _reserved_names(tokenizer)
    for key in kwargs:
        if key in reserved or not key.isidentifier():
            raise TemplateKwargsError(
                f"chat_template_kwargs cannot set {key!r}: "
                + (
                    "it is not a name a template can read"
                    if not key.isidentifier()
                    else "it is set by enginehouse itself (use the request's own field)"
                )
            )
    return dict(kwargs)


class TemplateKwargsError(RequestError):
    """Bad `chat_template_kwargs`; the server names the field."""

    param = "chat_template_kwargs"


def _reserved_names(tokenizer: Any) -> frozenset[str]:
    """The named arguments of the tokenizer's `apply_chat_template`, and `messages`."""
    try:
        params = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    except (TypeError, ValueError):
        params = ()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named | {"messages", "conversation", "tools", "add_generation_prompt"})


def _with_argument_objects(message: dict) -> dict:
    """An assistant message's tool calls with their arguments as objects: OpenAI sends them as
    JSON text, and templates (Qwen2.5's, Llama 3's...) write them with `tojson`."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                call = {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
            except ValueError:
                pass  # not JSON: the template gets the text as it is
        fixed.append(call)
    return {**message, "tool_calls": fixed}


_READS_PARTS: dict[str, bool] = {}  # by template text (not by tokenizer: none is kept alive)


def _reads_parts(template: str, tokenizer: Any) -> bool:
    # Render a probe message given as a list of parts: a template that reads parts writes the
    # probe's text; one that expects a string writes nothing of it (or fails).
    if template not in _READS_PARTS:
        probe = [{"role": "user", "content": [{"type": "text", "text": "PARTS-PROBE-1f6e"}]}]
        try:
            text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
        except Exception:
            text = ""
        _READS_PARTS[template] = "PARTS-PROBE-1f6e" in text and "'type'" not in text
    return _READS_PARTS[template]


def _processor_template(folder: Path) -> str | None:
    """The template a VLM's processor keeps in chat_template.json (older llava-hf checkpoints),
    where the tokenizer has none."""
    path = folder / "chat_template.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template else None


def _template_text(override: str | Path) -> str:
    """A Jinja string as it is, or the contents of the file it names."""
    text = str(override)
    if isinstance(override, str) and ("{{" in text or "{%" in text):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidModelError(
            f"chat_template {text!r} is neither a Jinja template (no '{{{{' or '{{%') nor an "
            "existing file; pass the template text or the path of a .jinja file"
        )
    return path.read_text(encoding="utf-8")


def load_chat_template(
    tokenizer: Any, spec: ModelSpec, override: str | Path | None = None
) -> ChatTemplate:
    if override is not None:
        return ChatTemplate(_template_text(override), "override")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is for chat
        own = own.get("default")
    if own:
        return ChatTemplate(own, "tokenizer")
    processor_own = _processor_template(spec.path)
    if processor_own:
        return ChatTemplate(processor_own, "processor")
    name = FAMILY_TEMPLATES.get(spec.model_type, "plain")
    return ChatTemplate(BUILTIN[name], f"builtin:{name}")
