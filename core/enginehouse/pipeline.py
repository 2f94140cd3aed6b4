"""`pipeline()`: a model identifier in, a ready `Pipeline` out, in six separate steps."""

from __future__ import annotations

import logging
import math
import os
import queue
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .backends import BackendDecision, choose_backend, probe_backends
from .chat_template import ChatTemplate, check_template_kwargs, load_chat_template
from .config import EngineConfig, GenerationConfig, coerce_generation_config, format_size
from .detect import detect_architecture
from .device import resolve_device, resolve_dtype
from .engine import AsyncEngine, LLMEngine, RequestOutput
from .engine.client import EngineClient
from .errors import BackendError, GenerationError, InvalidModelError, ParamError, RequestError
from .extensions import explain_extensions
from .lora_requests import AdapterChoice, Adapters, check_backend, choose, with_adapters
from .multimodal import (
    IMAGE_PART,
    PreparedPrompt,
    VisionEncoder,
    check_image_count,
    check_placeholders,
    flatten_parts,
    image_prompt,
    split_images,
)
from .parsers import reasoning_parser_for, tool_parser_for
from .platforms import platform_of
from .plugins import PluginHost, get_plugins
from .reasoning import Reasoning, ReasoningParser
from .resolve import resolve_model
from .response import Response
from .runner import (
    ModelRunner,
    RunnerContext,
    capability_problems,
    missing_members,
    session_length,
    undeclared_extras,
)
from .spec import ModelSpec, read_model_spec
from .tool_calls import Tool, ToolParser, ToolUse, resolve_tools

log = logging.getLogger(__name__)
SCORE_CONFIG = GenerationConfig(max_new_tokens=1)  # score-only requests generate nothing
Message = Mapping[str, Any]
# A string, a message list, {"token_ids": [...]}, or (text, image or images) for a VLM.
Prompt = str | Sequence[Message] | Mapping[str, Any] | tuple[str, Any]
GenConfigs = GenerationConfig | Mapping[str, Any] | Sequence[GenerationConfig] | None


def read_spec(
    model: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    plugins: PluginHost | None = None,
) -> ModelSpec:
    """Steps 1-3: resolve the identifier, read the folder once, merge the plugins' facts."""
    resolved = resolve_model(model, revision, cache_dir)
    spec = read_model_spec(resolved.path, resolved.model_id, revision)
    return detect_architecture(spec, plugins or get_plugins())


def decide_backend(
    spec: ModelSpec,
    config: EngineConfig,
    backend: str | None = None,
    plugins: PluginHost | None = None,
) -> BackendDecision:
    """Step 4: every backend's verdict, and the chosen one (raises when none fits)."""
    plugins = plugins or get_plugins()
    return choose_backend(probe_backends(spec, config, plugins), backend, plugins.problems())


def build_runner(
    decision: BackendDecision,
    spec: ModelSpec,
    config: EngineConfig,
    plugins: PluginHost | None = None,
    progress: bool = True,
) -> ModelRunner:
    """Step 7: the chosen backend's runner, built by the plugin that offered it, loaded.
    Under an executor (`config.executor`), the executor's driver: its ranks build theirs."""
    plugins = plugins or get_plugins()
    verdict = decision.chosen_verdict
    if config.executor is not None:
        return _start_executor(decision, spec, config, progress)
    context = RunnerContext.for_model(spec, config)
    runner = create_runner(verdict.plugin, verdict.name, spec, config, context, plugins)
    try:
        runner.load(progress)
    except BaseException:
        runner.close()  # free whatever part of the weights did load
        raise
    return runner


def create_runner(
    owner: str,
    backend: str,
    spec: ModelSpec,
    config: EngineConfig,
    context: RunnerContext,
    plugins: PluginHost,
) -> ModelRunner:
    """The runner plugin `owner` builds for `backend` (not loaded), checked against the
    contract: `BackendError` naming the plugin when it builds none, or something that is not
    a runner, or declares a capability it lacks the method for."""
    try:
        runner = plugins.call_one(
            owner, "create_runner", backend=backend, spec=spec, config=config, context=context
        )
    except Exception as e:
        raise BackendError(
            f"backend {backend!r} (plugin {owner!r}) failed to start: {type(e).__name__}: {e}"
        ) from e
    if runner is None:
        raise BackendError(
            f"plugin {owner!r} said it supports backend {backend!r} but built no runner "
            "for it; report this to the plugin's authors"
        )
    what = f"plugin {owner!r} built a {type(runner).__name__} for backend {backend!r}"
    missing = missing_members(runner)
    if missing:
        raise BackendError(
            f"{what}, which is not a runner: it lacks {', '.join(missing)} (see "
            "enginehouse.runner.ModelRunner); report this to the plugin's authors"
        )
    problems = capability_problems(runner)
    if problems:
        raise BackendError(
            f"{what}, whose capabilities do not hold: {'; '.join(problems)} (see "
            "enginehouse.runner.RunnerCapabilities); report this to the plugin's authors"
        )
    undeclared = undeclared_extras(runner)
    if undeclared:
        log.warning(
            "plugin %r: %s has %s without declaring it in `capabilities`; the engine does not "
            "call it (docs/plugins.md, 'Capabilities')",
            owner,
            type(runner).__name__,
            ", ".join(undeclared),
        )
    return runner


def _start_executor(
    decision: BackendDecision, spec: ModelSpec, config: EngineConfig, progress: bool
) -> ModelRunner:
    from .executor import make_executor

    executor = make_executor(decision, spec, config)
    try:
        executor.load(progress)
    except BaseException:
        executor.close()  # no rank is left running
        raise
    return executor


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    if not spec.tokenizer_files:
        raise InvalidModelError(
            f"{spec.path} has no tokenizer files (tokenizer.json, tokenizer.model, ...); "
            "copy them from the original model repository"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError) as e:  # transformers' words for missing files
        cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if "trust_remote_code" in str(e):
            raise InvalidModelError(
                f"the tokenizer of {spec.path} needs code from its repository ({cause}); "
                "allow it with trust_remote_code=True (--trust-remote-code) if you trust it"
            ) from e
        files = ", ".join(spec.tokenizer_files)
        vocabulary = ("tokenizer.json", "tokenizer.model", "vocab.json")
        if not any(f in spec.tokenizer_files for f in vocabulary):
            what = f"it has {files} but no tokenizer.json, tokenizer.model or vocab.json"
        else:
            what = f"its tokenizer files ({files}) could not be read"
        raise InvalidModelError(
            f"could not load the tokenizer of {spec.path}: {what} ({cause}); copy the "
            "tokenizer files from the original model repository"
        ) from e


def pipeline(
    model: str | os.PathLike[str],
    *,
    backend: str | None = None,
    engine_config: EngineConfig | Mapping[str, Any] | None = None,
    chat_template: str | Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    adapters: Adapters = None,
) -> Pipeline:
    """Build a ready inference pipeline for `model` (a local folder or a hub id).

    `backend` names a backend explicitly (`enginehouse explain MODEL` lists them); otherwise the
    supported one with the highest priority is chosen. `engine_config` takes an `EngineConfig`
    or a dict of its fields. `adapters` maps names to LoRA adapters (PEFT folders or hub ids)
    loaded at start; a request picks one with `adapter=NAME`.
    """
    config = with_adapters(EngineConfig.coerce(engine_config), adapters)
    if trust_remote_code and not config.trust_remote_code:
        config = config.model_copy(update={"trust_remote_code": True})
    plugins = get_plugins()
    spec = read_spec(model, revision, cache_dir, plugins)
    decision = decide_backend(spec, config, backend, plugins)
    check_backend(decision, config)
    tokenizer = load_tokenizer(spec, config.trust_remote_code)
    template = load_chat_template(tokenizer, spec, chat_template)
    if config.dp > 1:
        client = start_replicas(decision, spec, config, tokenizer, plugins, progress)
        return Pipeline(spec, decision, client, tokenizer, template)
    # The model is loaded on the thread that will run every step: torch work on a second
    # thread makes a second OpenMP thread team, and the steps then ran about 20-25% slower
    # here (2 cores) than when one thread does it all.
    worker = ThreadPoolExecutor(1, thread_name_prefix="enginehouse-step")
    try:
        engine = worker.submit(_build_engine, decision, spec, config, plugins, progress, tokenizer)
        return Pipeline(spec, decision, AsyncEngine(engine.result(), worker), tokenizer, template)
    except BaseException:
        worker.shutdown(wait=True)
        raise


def start_replicas(
    decision: BackendDecision,
    spec: ModelSpec,
    config: EngineConfig,
    tokenizer: Any,
    plugins: PluginHost,
    progress: bool = True,
) -> EngineClient:
    """`config.dp` engine replicas, each in its own process, behind one client. They load in
    parallel; when one fails to start, the others are closed and the error names it."""
    from .engine.core_process import CoreInit
    from .engine.data_parallel import DataParallelClient, replica_places
    from .engine.process_client import ProcessClient, SubprocessTransport

    vision = None  # this process prepares prompts with its processor; replicas encode
    if spec.is_vlm:
        vision = plugins.hook.create_vision_encoder(spec=spec, config=config)
    on_ray = config.executor == "ray"
    gpu = resolve_device(config).type == "cuda"
    replica = config.model_copy(update={"dp": 1})
    if on_ray and config.tp == 1:  # the replica's actor runs its one rank itself
        replica = replica.model_copy(update={"distributed_executor_backend": None})
    budget = config.kv_cache_memory
    if isinstance(budget, float) and not gpu and not on_ray:
        # CPU replicas share this machine's memory: each takes its part of the fraction.
        replica = replica.model_copy(update={"kv_cache_memory": budget / config.dp})
    places = replica_places(config, config.dp) if not on_ray else [(None, {})] * config.dp
    if on_ray:  # once, from the caller's thread (Ray sets signal handlers there)
        from .executor.ray_executor import connect_ray

        connect_ray()

    def start(i: int) -> ProcessClient:
        cores, env = places[i]
        init = CoreInit(decision, spec, replica, f"replica {i}", progress and i == 0, cores)
        if on_ray:
            from .engine.ray_replica import RayTransport

            return ProcessClient(init, tokenizer, vision, RayTransport(int(gpu and config.tp == 1)))
        return ProcessClient(init, tokenizer, vision, SubprocessTransport(env))

    with ThreadPoolExecutor(config.dp, thread_name_prefix="enginehouse-start") as pool:
        futures = [pool.submit(start, i) for i in range(config.dp)]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except BaseException as e:
            errors.append(e)
    if errors:
        for client in started:
            client.close()
        raise errors[0]
    return DataParallelClient(started)


def _build_engine(
    decision: BackendDecision,
    spec: ModelSpec,
    config: EngineConfig,
    plugins: PluginHost,
    progress: bool,
    tokenizer: Any,
) -> LLMEngine:
    runner = build_runner(decision, spec, config, plugins, progress)
    vision = None
    try:
        if spec.is_vlm:
            vision = build_vision_encoder(spec, config, plugins, runner, progress)
        return LLMEngine(runner, tokenizer, spec, config, vision)
    except BaseException:
        runner.close()
        if vision is not None:
            vision.close()
        raise


def build_vision_encoder(
    spec: ModelSpec,
    config: EngineConfig,
    plugins: PluginHost,
    runner: ModelRunner,
    progress: bool = True,
) -> VisionEncoder:
    """The image side of a VLM, loaded on the language model's device and in its dtype."""
    encoder = plugins.hook.create_vision_encoder(spec=spec, config=config)
    if encoder is None:
        raise BackendError(
            f"{spec.architecture} is a vision-language model but no installed plugin can encode "
            "its images; install the vision plugin: pip install 'enginehouse[vision]'"
        )
    encoder.load(runner.kv_spec.device, runner.kv_spec.dtype, progress)
    return encoder


def _is_image_prompt(prompt: Any, vlm: bool) -> bool:
    # ("text", image): a str second item is an image path or URL only for a VLM; for a text
    # model a pair of strings stays a batch of two prompts.
    return (
        isinstance(prompt, tuple)
        and len(prompt) == 2
        and isinstance(prompt[0], str)
        and (vlm or not isinstance(prompt[1], str))
    )


def _is_conversation(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and (len(prompt) > 0 and all(isinstance(m, Mapping) and "role" in m for m in prompt))
    )


class Pipeline:
    """A model behind an engine. Use `pipe(prompts)`, `pipe.stream(...)`, `pipe.chat(...)`."""

    def __init__(
        self,
        spec: ModelSpec,
        backend_decision: BackendDecision,
        engine: EngineClient,
        tokenizer: Any,
        chat_template: ChatTemplate,
    ) -> None:
        self.spec = spec
        self.backend_decision = backend_decision
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # How this model writes tool calls and its reasoning, from its template; set others
        # to override (enginehouse.tool_calls.PARSERS, enginehouse.reasoning.PARSERS).
        self.tool_parser: ToolParser | None = tool_parser_for(chat_template.template)
        self.reasoning_parser: ReasoningParser | None = reasoning_parser_for(chat_template.template)

    @property
    def backend(self) -> str | None:
        return self.backend_decision.chosen

    @property
    def runner(self) -> ModelRunner | None:
        """The backend's runner where it runs in this process (None where the engine core
        runs in another process: `EngineConfig.dp`, or an executor's ranks)."""
        return self.engine.runner

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (the engine's rule: the model's config)."""
        return self.engine.checks.vocab_size

    @property
    def session_len(self) -> int:
        """The context length the engine enforces: prompt and output together."""
        return self.engine.session_len

    @property
    def vision(self) -> VisionEncoder | None:
        """The image encoder of a vision-language model; None for a text model."""
        return self.engine.vision

    def summary(self) -> dict[str, Any]:
        """What the engine runs with: backend, context, dtype, device and the KV cache."""
        kv, stats = self.engine.kv_spec, self.stats()
        blocks = stats["kv_blocks_total"]
        kv_bytes = blocks * kv.bytes_per_block
        counts = stats.get("kv_group_blocks_total")
        if kv.groups and counts:  # each group's blocks in its own size (KV layer groups)
            sizes = [g.block_bytes(kv.block_size) for g in kv.groups]
            kv_bytes = sum(n * b for n, b in zip(counts, sizes))
        return {
            "backend": self.backend,
            **self.engine.describe(),
            "session_len": self.session_len,
            "dtype": str(kv.dtype).removeprefix("torch."),
            "device": str(kv.device),
            "kv_blocks": blocks,
            "kv_tokens": blocks * kv.block_size,
            "kv_bytes": kv_bytes,
            "kv_cache_dtype": kv.cache_dtype,  # "auto" (dtype), "int8" or "fp8"
        }

    # --- inputs -----------------------------------------------------------------------------

    def encode(
        self,
        prompt: Prompt,
        apply_chat_template: bool = True,
        tools: list[Tool] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids for one prompt: a string, a message list, or {"token_ids": [...]}.

        A prompt with images has its placeholders expanded; `prepare` also gives its images.
        """
        return self.prepare(prompt, apply_chat_template, tools, chat_template_kwargs).token_ids

    def prepare(
        self,
        prompt: Prompt | PreparedPrompt,
        apply_chat_template: bool = True,
        tools: list[Tool] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> PreparedPrompt:
        """One prompt as the engine takes it: token ids, and for a VLM its images. `tools`
        (OpenAI's function tools) go to the chat template, and so do `chat_template_kwargs`
        as its variables (`{"enable_thinking": False}`). A prepared prompt stays as it is."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        if isinstance(prompt, _Refused):
            raise RequestError(prompt.message)
        if isinstance(prompt, Mapping):
            if "token_ids" not in prompt:
                raise RequestError("a dict prompt must be {'token_ids': [...]}")
            return PreparedPrompt([int(t) for t in prompt["token_ids"]])
        vision = self.vision
        body, images = prompt, []
        if _is_image_prompt(prompt, vision is not None) or _is_conversation(prompt):
            split = split_images(prompt)
            body, images = split.prompt, split.images
        if images and vision is None:
            raise RequestError(
                f"{self.spec.architecture} takes text only, but the prompt has images; use a "
                "vision-language model (see `enginehouse explain MODEL`)"
            )
        if images:
            check_image_count(len(images), self.engine.config)
        text, special = self._text(body, images, apply_chat_template, tools, chat_template_kwargs)
        if not images:
            return PreparedPrompt(self.tokenizer.encode(text, add_special_tokens=special))
        assert vision is not None
        check_placeholders(text, len(images), vision.image_token)
        return vision.prepare(text, images, special, max_tokens=self.engine.session_len)

    def _text(
        self,
        prompt: Any,
        images: list[Any],
        apply_chat_template: bool,
        tools: Any = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """The prompt's text, and whether tokenizing it adds special tokens (not after a
        template: the template already wrote any BOS token, and it would double)."""
        vision = self.vision
        placeholder = vision.image_placeholder if vision is not None else ""
        if isinstance(prompt, str):
            if not tools and (not apply_chat_template or self.chat_template.is_builtin):
                if vision is None:
                    return prompt, True
                return image_prompt(prompt, len(images), vision.image_token, placeholder), True
            content: Any = prompt
            if images:
                content = [IMAGE_PART] * len(images) + [{"type": "text", "text": prompt}]
            prompt = [{"role": "user", "content": content}]
        if not _is_conversation(prompt):
            raise RequestError(
                "a prompt must be a string, a list of {'role', 'content'} messages, "
                "(text, image), or {'token_ids': [...]}; got " + type(prompt).__name__
            )
        messages = [dict(m) for m in prompt]
        if not self.chat_template.reads_parts(self.tokenizer):
            messages = flatten_parts(messages, placeholder)
        kwargs = check_template_kwargs(template_kwargs, self.tokenizer)
        try:
            text = self.chat_template.render(
                self.tokenizer, messages, tools=tools, template_kwargs=kwargs
            )
            return text, False
        except Exception as e:  # a template may reject a conversation (roles, order)
            raise RequestError(f"the chat template rejected the messages: {e}") from e

    def _batch(self, prompts: Any) -> tuple[list[Prompt], bool]:
        single = (
            isinstance(prompts, (str, Mapping))
            or not isinstance(prompts, Sequence)
            or _is_conversation(prompts)
            or _is_image_prompt(prompts, self.vision is not None)
        )
        return ([prompts] if single else list(prompts)), single

    def _configs(self, gen_config: GenConfigs, n: int) -> list[GenerationConfig]:
        if isinstance(gen_config, Sequence) and not isinstance(gen_config, (str, Mapping)):
            if len(gen_config) != n:
                raise RequestError(f"got {len(gen_config)} generation configs for {n} prompts")
            configs = [coerce_generation_config(c) for c in gen_config]
        else:
            configs = [coerce_generation_config(gen_config)] * n
        return [
            self.token_rules(c.with_model_defaults(self.spec.generation_config)) for c in configs
        ]

    def token_rules(self, config: GenerationConfig) -> GenerationConfig:
        """`config` with its `bad_words` also as token sequences (`bad_words_ids`, what the
        sampler reads), and every token id it names checked against the vocabulary
        (`ParamError` naming the field and the id)."""
        if config.bad_words:
            words = [list(w) for w in config.bad_words_ids or []]
            for word in config.bad_words:
                # As vLLM: the word alone, and as it reads after a space (another token).
                for text in (word.lstrip(), " " + word.lstrip()):
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                    if ids and ids not in words:
                        words.append(ids)
            config = config.model_copy(update={"bad_words_ids": words})
        for field, token in config.token_ids_used():
            if not 0 <= token < self.vocab_size:
                raise ParamError(
                    f"{field}: token id {token} is outside the vocabulary "
                    f"(0..{self.vocab_size - 1}); give ids of this model's tokenizer",
                    field,
                )
        return config

    # --- generation -------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenConfigs = None,
        *,
        tools: list[Tool] | None = None,
        tool_choice: str | Mapping[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        apply_chat_template: bool = True,
        progress: bool = False,
        adapter: AdapterChoice = None,
    ) -> Response | list[Response]:
        """Generate for one prompt (one `Response`) or a list (a list, in order).

        In a list, a prompt the engine cannot serve ends with `finish_reason="error"` and its
        `error`, and the others still run; a single bad prompt raises `RequestError`.
        `tools` (OpenAI's function tools) go to the chat template, and the calls the model
        makes come back parsed in `Response.tool_calls`; `tool_choice` "required" or
        {"type": "function", "function": {"name": ...}} makes it call one (docs/tools).
        `chat_template_kwargs` are the template's variables (`{"enable_thinking": False}`).
        A reasoning model's thinking comes apart from its answer, in `Response.reasoning`.
        `adapter` names the LoRA adapter to run with (one for all prompts, or a list, one per
        prompt; None is the base model).
        """
        items, single = self._batch(prompts)
        use = self.tool_use(tools, tool_choice, parallel_tool_calls)
        results = [Response(index=i) for i in range(len(items))]
        bar = tqdm(total=len(items), disable=not progress, desc="generating")
        deltas = self._stream(
            items, gen_config, apply_chat_template, single, use, chat_template_kwargs, adapter
        )
        for delta in deltas:
            results[delta.index].extend(delta)
            if delta.finish_reason is not None:
                bar.update(1)
        bar.close()
        if use is not None:
            for r in results:
                r.take_tool_calls(use)
        return results[0] if single else results

    def tool_use(
        self,
        tools: list[Tool] | None,
        tool_choice: str | Mapping[str, Any] | None = "auto",
        parallel_tool_calls: bool | None = True,
    ) -> ToolUse | None:
        """A request's tools checked against this model (`RequestError` when they cannot be
        used); None when no tool may be called."""
        template = self.chat_template.template
        return resolve_tools(tools, tool_choice, parallel_tool_calls, template, self.tool_parser)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenConfigs = None,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        apply_chat_template: bool = True,
        adapter: AdapterChoice = None,
    ) -> Iterator[Response]:
        """Deltas as they are produced, each tagged with its prompt's `index`; a reasoning
        model's deltas carry its thinking in `reasoning` and its answer in `text`."""
        items, single = self._batch(prompts)
        yield from self._stream(
            items, gen_config, apply_chat_template, single, None, chat_template_kwargs, adapter
        )

    def _stream(
        self,
        items: list[Prompt],
        gen_config: GenConfigs,
        apply_chat_template: bool,
        raise_single: bool,
        tools: ToolUse | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        adapter: AdapterChoice = None,
    ) -> Iterator[Response]:
        configs = choose(self._configs(gen_config, len(items)), adapter)
        if tools is not None:
            configs = [tools.generation_config(c) for c in configs]
        requests: list[tuple[Any, GenerationConfig]] = []
        readers = []
        for item, config in zip(items, configs):
            try:
                tool_list = tools.tools if tools is not None else None
                prompt = self.prepare(item, apply_chat_template, tool_list, template_kwargs)
                templated = self._templated(item, apply_chat_template, tools is not None)
                reasoning = self.reasoning_for(prompt.token_ids) if templated else None
                if reasoning is not None:
                    config = reasoning.generation_config(config)
            except RequestError as e:
                if raise_single:
                    raise
                prompt, reasoning = _Refused(str(e)), None  # refused in turn, with the others
            requests.append((prompt, config))
            readers.append(reasoning.stream() if reasoning is not None else None)
        outputs = self._outputs(requests, apply_chat_template, raise_single, tools=tools)
        for i, out in outputs:
            r = out if isinstance(out, Response) else Response.from_output(i, out)
            reader = readers[i]
            if reader is not None and r.finish_reason != "error":
                thought, r.text = reader.feed(r.text, final=r.finish_reason is not None)
                r.reasoning = thought or None
            yield r

    def reasoning_for(self, prompt_ids: list[int]) -> Reasoning | None:
        """How the output of a prompt (rendered by the chat template) divides into reasoning
        and answer; None when the model has no reasoning parser."""
        if self.reasoning_parser is None:
            return None
        tail = self.tokenizer.decode(prompt_ids[-32:], skip_special_tokens=False)
        return Reasoning.for_prompt(self.reasoning_parser, tail)

    def _templated(self, prompt: Any, apply_chat_template: bool, tools: bool) -> bool:
        """Whether `prepare` put this prompt through the chat template (as `_text` decides)."""
        if isinstance(prompt, (Mapping, PreparedPrompt)):
            return False
        if _is_conversation(prompt):
            return True
        return tools or (apply_chat_template and not self.chat_template.is_builtin)

    def _outputs(
        self,
        requests: list[tuple[Prompt, GenerationConfig]],
        apply_chat_template: bool,
        raise_single: bool,
        score_only: bool = False,
        tools: ToolUse | None = None,
    ) -> Iterator[tuple[int, RequestOutput | Response]]:
        """Submit every request, then yield (index, engine output) as they come. A request
        that cannot be served yields an error `Response`, or raises with `raise_single`: a
        `RequestError` when it is refused, a `GenerationError` when the backend fails on it."""
        q: queue.Queue[tuple[int, RequestOutput]] = queue.Queue()
        pending: dict[str, int] = {}
        refused: list[tuple[int, Response]] = []
        try:
            with self.engine.together():
                for i, (prompt, cfg) in enumerate(requests):
                    try:
                        prepared = self.prepare(
                            prompt, apply_chat_template, tools.tools if tools else None
                        )
                        self.wait_for_grammar(cfg)
                        rid = self.engine.submit(
                            prepared.token_ids,
                            cfg,
                            lambda o, i=i: q.put((i, o)),
                            score_only=score_only,
                            mm=prepared.mm,
                        )
                    except RequestError as e:
                        if raise_single:
                            raise
                        refused.append((i, Response(index=i, finish_reason="error", error=str(e))))
                        continue
                    pending[rid] = i
            yield from refused
            while pending:
                i, out = q.get()
                if out.finished:
                    pending.pop(out.request_id, None)
                    if raise_single and out.finish_reason == "error":
                        raise GenerationError(out.error or "the request failed")
                yield i, out
        finally:
            for rid in pending:  # the caller stopped early: free their KV blocks
                self.engine.abort(rid)

    def wait_for_grammar(self, config: GenerationConfig) -> None:
        """Compile the request's grammar now (cached), so that a bad schema, regex or grammar
        raises `RequestError` here rather than ending the request with an error."""
        constraint = config.constraint
        if constraint is not None:
            self.engine.compile_grammar(constraint).result()

    def get_ppl(self, prompts: Prompt | Sequence[Prompt]) -> float | list[float]:
        """Perplexity of each prompt (exp of the mean negative log-likelihood per token).

        Prompts are scored as given (strings are not wrapped in the chat template), all of
        them as one batch.
        """
        items, single = self._batch(prompts)
        requests = []
        for prompt in items:
            prepared = self.prepare(prompt, apply_chat_template=False)
            if prepared.mm is not None:
                raise RequestError(
                    "perplexity is computed for text prompts only; this one has images"
                )
            if len(prepared.token_ids) < 2:
                raise RequestError("perplexity needs a prompt of at least two tokens")
            requests.append(({"token_ids": prepared.token_ids}, SCORE_CONFIG))
        sums: dict[int, float] = {}
        for i, out in self._outputs(requests, False, raise_single=True, score_only=True):
            if isinstance(out, RequestOutput) and out.finished:
                sums[i] = out.prompt_logprob_sum or 0.0
        counts = [len(prompt["token_ids"]) - 1 for prompt, _ in requests]
        ppl = [math.exp(-sums[i] / counts[i]) for i in range(len(items))]
        return ppl[0] if single else ppl

    def chat(
        self,
        prompt: str | Message | Sequence[Message],
        session: ChatSession | None = None,
        gen_config: GenConfigs = None,
        *,
        tools: list[Tool] | None = None,
        tool_choice: str | Mapping[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        adapter: str | None = None,
    ) -> ChatSession:
        """One turn of a conversation; pass the returned session back for the next turn.

        `prompt` is the user's text, or the messages to add (e.g. `tool` results) as they are.
        The assistant's tool calls, if any, are kept in the history in OpenAI's shape, and
        its reasoning as `reasoning_content` (which templates such as Qwen3's read).
        """
        session = session or ChatSession()
        if isinstance(prompt, str):
            session.history.append({"role": "user", "content": prompt})
        elif isinstance(prompt, Mapping):
            session.history.append(dict(prompt))
        else:
            session.history.extend(dict(m) for m in prompt)
        response = self(
            list(session.history),
            gen_config,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            chat_template_kwargs=chat_template_kwargs,
            adapter=adapter,
        )
        assert isinstance(response, Response)
        message: dict[str, Any] = {"role": "assistant", "content": response.text}
        if response.reasoning:
            message["reasoning_content"] = response.reasoning
        if response.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in response.tool_calls]
        session.history.append(message)
        session.response = response
        return session

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load a LoRA adapter (a PEFT folder or hub id) under `name`, while serving; raises
        `AdapterError` naming the file and the reason when it cannot be served."""
        self.engine.load_adapter(name, os.fspath(path))

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter no unfinished request uses; its slot is free again."""
        self.engine.unload_adapter(name)

    def adapters(self) -> list[dict[str, Any]]:
        """The loaded adapters: name, source, rank, slot, bytes, running requests."""
        return self.engine.adapters()

    def stats(self) -> dict[str, int]:
        """Engine counters: running and waiting requests, KV blocks used and in total."""
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()  # the engine's runner, grammars and image encoder too

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Refused:
    """A prompt already refused while it was prepared: `prepare` raises its error again, so
    that it ends like any refused prompt of a batch."""

    def __init__(self, message: str) -> None:
        self.message = message


class ChatSession:
    """The messages of one conversation, and the last response."""

    def __init__(self, system: str | None = None) -> None:
        self.history: list[dict[str, Any]] = []
        if system:
            self.history.append({"role": "system", "content": system})
        self.response: Response | None = None

    def reset(self) -> None:
        system = [m for m in self.history[:1] if m["role"] == "system"]
        self.history = system
        self.response = None


def explain(
    model: str | os.PathLike[str],
    *,
    backend: str | None = None,
    engine_config: EngineConfig | Mapping[str, Any] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """What `pipeline()` would decide for `model`, without loading weights."""
    config = EngineConfig.coerce(engine_config)
    plugins = get_plugins()
    spec = read_spec(model, revision, cache_dir, plugins)
    verdicts = probe_backends(spec, config, plugins)
    try:
        decision = choose_backend(verdicts, backend, plugins.problems())
        error = None
    except BackendError as e:
        decision = BackendDecision(chosen=None, requested=backend, verdicts=tuple(verdicts))
        error = str(e)
    return {
        "model": spec.model_id,
        "path": str(spec.path),
        "architecture": spec.architecture,
        "facts": dict(spec.facts),
        **decision.as_dict(),
        "error": error,
        "plugin_problems": plugins.problems(),
        "runtime": runtime_plan(spec, config),
        "chat": chat_formats(spec, config),
        **explain_extensions(plugins, spec.architecture, config.device),
    }


def chat_formats(spec: ModelSpec, config: EngineConfig) -> dict[str, Any]:
    """Where the chat template comes from and the tool-call and reasoning formats chosen from
    it (what `serve` logs at start), read from the tokenizer files alone."""
    try:
        template = load_chat_template(load_tokenizer(spec, config.trust_remote_code), spec)
    except InvalidModelError as e:
        return {"error": str(e)}
    tool, reasoning = tool_parser_for(template.template), reasoning_parser_for(template.template)
    return {
        "template": template.source,
        "tool_parser": tool.name if tool else None,
        "reasoning_parser": reasoning.name if reasoning else None,
    }


def runtime_plan(spec: ModelSpec, config: EngineConfig) -> dict[str, Any]:
    """What the engine will run with, as far as it is known before any weights load: the
    context length, the device, the dtype the bundled backends pick, and the KV budget."""
    plan: dict[str, Any] = {"session_len": session_length(spec, config)}
    try:
        device = resolve_device(config)
    except RuntimeError as e:
        return {**plan, "device": None, "error": str(e)}
    plan["device"] = str(device)
    platform = platform_of(config.device)[0]
    plan["platform"] = platform.name
    plan["dtype"] = str(resolve_dtype(config, spec, device)).removeprefix("torch.")
    if config.executor is not None:
        collectives = platform.collective_backend
        place = "on a Ray cluster" if config.executor == "ray" else "worker processes here"
        plan["ranks"] = f"{config.tp} ({config.executor} executor: {place}, {collectives})"
    if config.dp > 1:
        where = "Ray actors" if config.executor == "ray" else "processes here"
        split = "their GPUs" if device.type == "cuda" else "the cores and the KV budget"
        plan["replicas"] = (
            f"{config.dp} engine replicas ({where}, {config.tp} rank{'s' * (config.tp > 1)} "
            f"each, splitting {split}); requests go to the least loaded, or where their "
            "prefix is cached"
        )
    budget = config.kv_cache_memory
    if isinstance(budget, float):
        # The real budget is taken after loading; estimate it from what is free now.
        free_after = max(0, platform.free_memory(device) - spec.weight_bytes)
        plan["kv_cache"] = (
            f"{budget:.0%} of the memory free after the weights load "
            f"(about {format_size(free_after * budget)} now)"
        )
    else:
        plan["kv_cache"] = format_size(budget) + (" per rank" if config.executor else "")
    plan["weights"] = format_size(spec.weight_bytes)
    return plan
