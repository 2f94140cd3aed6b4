"""The `enginehouse` command line: plugins, explain, generate, plus plugins' own commands."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from .backends import conflict_message, offered_backends
from .config import EngineConfig, GenerationConfig, format_size, parse_size
from .errors import EnginehouseError, describe_validation_error
from .plugins import SELECT_VAR, get_plugins, unmatched_message


def _friendly_errors(fn: Callable) -> Callable:
    """Show our errors and invalid settings as one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EnginehouseError as e:
            raise click.ClickException(str(e)) from e
        except ValidationError as e:
            raise click.ClickException(describe_validation_error(e)) from e

    return wrapper


def _option_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        return click.Choice(typing.get_args(base))
    return base if base in (int, float, bool) else str


def _number_or_size(text: str) -> int | float | str:
    """'0.8' is a fraction, '1073741824' a byte count, '2GiB' a size for EngineConfig."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# vLLM's long names beside the fields' own short ones.
FLAG_ALIASES = {"dp": ("--data-parallel-size",), "tp": ("--tensor-parallel-size",)}


def engine_options(fn: Callable) -> Callable:
    """One `--flag` per `EngineConfig` field; the command gets them as `engine_config`."""
    names = list(EngineConfig.model_fields)
    for name, field in reversed(EngineConfig.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        kind = _option_type(field.annotation)
        if kind is bool:
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        flags = (*FLAG_ALIASES.get(name, ()), flag)
        if name == "lora_modules":  # vLLM's name=path pairs; the flag may come again
            fn = click.option(flag, name, multiple=True, help=field.description)(fn)
            continue
        fn = click.option(*flags, name, type=kind, default=None, help=field.description)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {n: kwargs.pop(n) for n in names}
        given = {n: v for n, v in values.items() if v is not None and v != ()}
        if isinstance(given.get("kv_cache_memory"), str):
            given["kv_cache_memory"] = _number_or_size(given["kv_cache_memory"])
        return fn(*args, engine_config=EngineConfig(**given), **kwargs)

    return wrapper


# One default for every surface: GenerationConfig's, which `generate` and `chat` show.
MAX_NEW_TOKENS = GenerationConfig.model_fields["max_new_tokens"].default


def _generation_config(
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...] = (),
) -> GenerationConfig:
    """The sampling flags of `generate` and `chat`: any of them given turns sampling on."""
    sampling: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if sampling:
        sampling["do_sample"] = True
    return GenerationConfig(
        max_new_tokens=max_new_tokens, random_seed=seed, stop_words=list(stop), **sampling
    )


@click.group()
@click.version_option(package_name="enginehouse")
def cli() -> None:
    """enginehouse: a model identifier in, an inference pipeline out."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool) -> None:
    """List plugins: name, distribution, version, hooks, backends offered and load errors."""
    from .extensions import by_plugin

    host = get_plugins()
    offered, extras = offered_backends(host), by_plugin(host)
    infos = [
        {**i.as_dict(), "backends": offered.get(n, []), **extras.get(n, {})}
        for n, i in host.infos.items()
    ]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for info in infos:
        dist = f"{info['distribution'] or '?'} {info['version'] or ''}".strip()
        click.echo(f"{info['name']}  ({dist})")
        if info["error"]:
            click.echo(f"    FAILED TO LOAD: {info['error']}")
            continue
        click.echo(f"    contract: {info['contract'] or 'undeclared (deprecated)'}")
        click.echo(f"    hooks: {', '.join(info['hooks']) or '-'}")
        if info["backends"]:
            click.echo(f"    backends: {', '.join(info['backends'])}")
        for key in ("platforms", "model_families", "logits_processors"):
            if info.get(key):
                click.echo(f"    {key.replace('_', ' ')}: {', '.join(info[key])}")
    owners: dict[str, list[str]] = {}
    for plugin, names in offered.items():
        for name in names:
            owners.setdefault(name, []).append(plugin)
    for name, plugins in owners.items():
        if len(plugins) > 1:
            click.echo(
                f"conflict: {conflict_message(name, plugins)}; ask for one as "
                f"--backend {plugins[0]}:{name}, or load one with {SELECT_VAR}"
            )
    for name in host.unmatched:
        click.echo(f"warning: {unmatched_message([name])}")


@cli.command()
@click.argument("model")
@click.option("--backend", default=None, help="check this backend as if it were asked for")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_friendly_errors
@engine_options
def explain(
    model: str, backend: str | None, revision: str | None, as_json: bool, engine_config
) -> None:
    """Show how MODEL would be run, and why, without loading its weights."""
    from .pipeline import explain as explain_model

    report = explain_model(model, backend=backend, engine_config=engine_config, revision=revision)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    facts, plan = report["facts"], report["runtime"]
    click.echo(f"model:        {report['model']}")
    click.echo(f"architecture: {report['architecture']} (family {facts.get('family')})")
    click.echo(f"vision model: {_vision_line(facts)}")
    click.echo(f"context:      {plan['session_len']} tokens")
    if plan["device"] is None:
        click.echo(f"device:       {plan['error']}")
    else:
        click.echo(f"device:       {plan['device']}, {plan['dtype']}")
        click.echo(f"weights:      {plan['weights']}")
        click.echo(f"KV cache:     {plan['kv_cache']}")
        if plan.get("ranks"):
            click.echo(f"ranks:        {plan['ranks']}")
        if plan.get("replicas"):
            click.echo(f"replicas:     {plan['replicas']}")
    click.echo(f"platform:     {_platform_line(report)}")
    if report["model_family"]:
        f = report["model_family"]
        click.echo(
            f"family:       {report['architecture']} from plugin {f['plugin']} (the "
            f"{f['base']} decoder of the {f['backend']} backend)"
        )
    if report["logits_processors"]:
        names = (f"{n} [{p}]" for n, p in report["logits_processors"].items())
        click.echo(f"processors:   {', '.join(names)}")
    if facts.get("quantization"):
        click.echo(f"quantized:    {facts['quantization']}")
    chat = report["chat"]
    if "error" in chat:
        click.echo(f"chat:         {chat['error']}")
    else:
        click.echo(
            f"chat:         template from the {chat['template']}; tool calls "
            f"{chat['tool_parser'] or 'none'}; reasoning {chat['reasoning_parser'] or 'none'}"
        )
    chosen = report["chosen"]
    if chosen and report["chosen_plugin"] != chosen:
        chosen = f"{chosen} (plugin {report['chosen_plugin']})"
    click.echo(f"chosen:       {chosen or 'none'}")
    chosen_verdict = next((v for v in report["verdicts"] if v["backend"] == report["chosen"]), None)
    if chosen_verdict is not None:
        takes = "yes" if chosen_verdict.get("lora_adapters") else "no (this backend takes none)"
        click.echo(f"LoRA adapters: {takes}")
    click.echo("backends:")
    for v in report["verdicts"]:
        mark = "yes" if v["supported"] else "no "
        verify = "  verifies several tokens per step" if v.get("verifies_tokens") else ""
        verify += ", drafts with a head (eagle/mtp)" if v.get("drafts_tokens") else ""
        line = f"  {mark} {v['backend']:<13} priority {v['priority']:<4} [{v['plugin']}]"
        click.echo(line + verify)
        click.echo(f"        {v['reason']}")
    for name, owners in report["conflicts"].items():
        first = owners[0]
        click.echo(
            f"conflict: {conflict_message(name, owners)}; ask for one as "
            f"--backend {first}:{name}, or load one with {SELECT_VAR}"
        )
    for problem in report["plugin_problems"]:
        click.echo(f"warning: {problem}")
    if report["error"]:
        raise click.ClickException(report["error"])


def sampling_options(fn: Callable) -> Callable:
    """--temperature, --top-p, --top-k and --seed, shared by generate and chat."""
    for option in reversed(
        [
            click.option(
                "--temperature", type=float, default=None, help="sample at this temperature"
            ),
            click.option("--top-p", type=float, default=None),
            click.option("--top-k", type=int, default=None),
            click.option("--seed", type=int, default=None, help="make sampling reproducible"),
        ]
    ):
        fn = option(fn)
    return fn


def _platform_line(report: dict[str, Any]) -> str:
    """The platform `device` names, and the others the plugins declare."""
    chosen, every = report["platform"], report["platforms"]
    others = ", ".join(f"{n} [{p['plugin']}]" for n, p in every.items() if n != chosen)
    if chosen is None:
        return f"none (have: {others})"
    p = every[chosen]
    return (
        f"{chosen} [{p['plugin']}]: {p['collectives']} collectives, "
        f"{'graph capture' if p['graph_capture'] else 'eager'}; others: {others or 'none'}"
    )


def _vision_line(facts: dict[str, Any]) -> str:
    if not facts.get("is_vlm"):
        return "no"
    text = facts.get("text_architecture", "?")
    if facts.get("vision_encoder"):
        return f"yes: images by the {facts['vision_encoder']} encoder, text by {text}"
    why = facts.get("vision_unsupported") or "install the vision plugin"
    return f"yes, but no image encoder: {why}"


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1, required=True)
@click.option("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, show_default=True)
@sampling_options
@click.option("--stop", multiple=True, help="a stop string (repeatable)")
@click.option("--system", default=None, help="a system message")
@click.option("--raw", is_flag=True, help="send the prompt as is, without the chat template")
@click.option(
    "--image",
    "images",
    multiple=True,
    help="an image for a vision-language model: a path, data: or http(s) URL (repeatable)",
)
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--backend", default=None, help="run on this backend (see explain)")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
@_friendly_errors
@engine_options
def generate(
    model: str,
    prompt: tuple[str, ...],
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...],
    system: str | None,
    raw: bool,
    images: tuple[str, ...],
    stream: bool,
    backend: str | None,
    revision: str | None,
    engine_config: EngineConfig,
) -> None:
    """Generate a continuation of PROMPT with MODEL (a folder or a hub id)."""
    from .chat_cli import printable
    from .pipeline import pipeline

    gen = _generation_config(max_new_tokens, temperature, top_p, top_k, seed, stop)
    if images:
        _check_images(model, revision, images)
    text = " ".join(prompt)
    request: Any = (text, list(images)) if images else text
    if system and not raw:
        content: Any = text
        if images:
            content = [{"type": "image", "image": i} for i in images]
            content.append({"type": "text", "text": text})
        request = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    with pipeline(model, backend=backend, engine_config=engine_config, revision=revision) as pipe:
        if stream:
            for delta in pipe.stream(request, gen, apply_chat_template=not raw):
                click.echo(printable(delta.text), nl=False)
            click.echo()
        else:
            click.echo(printable(pipe(request, gen, apply_chat_template=not raw).text))


def _check_images(model: str, revision: str | None, images: tuple[str, ...]) -> None:
    """What `--image` can get wrong, found before any weights load."""
    from .pipeline import read_spec

    local = [i for i in images if not i.startswith(("http://", "https://", "data:"))]
    for image in local:
        path = Path(image.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise click.BadParameter(f"{image!r} is not a file", param_hint="--image")
    spec = read_spec(model, revision)
    if not spec.is_vlm:
        raise click.BadParameter(
            f"{spec.architecture} takes text only; --image needs a vision-language model "
            "(see `enginehouse explain MODEL`)",
            param_hint="--image",
        )


@cli.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port")
@click.option(
    "--api-key",
    envvar="ENGINEHOUSE_API_KEY",
    default=None,
    help="require 'Authorization: Bearer KEY' on every endpoint but /health "
    "[env: ENGINEHOUSE_API_KEY]",
)
@click.option(
    "--served-model-name",
    default=None,
    help="the name clients ask for [default: the model folder's name, or the hub id]",
)
@click.option("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
@click.option("--backend", default=None, help="run on this backend (see explain)")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
@click.option(
    "--allowed-local-media-path",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="clients may name image files (file://) under this folder; otherwise images come "
    "inline (data:) or from --allowed-media-domains",
)
@click.option(
    "--max-request-body-size",
    default="32MiB",
    show_default=True,
    help="larger request bodies are refused with 413 (a size: 32MiB, 100MB, bytes)",
)
@click.option(
    "--max-seqs-per-request",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="most sequences (prompts x n) one request may start",
)
@click.option(
    "--engine-iteration-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="seconds one engine step may run before /health reports the engine stuck",
)
@click.option(
    "--max-stop-strings",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="most stop strings one request may give",
)
@click.option(
    "--max-stop-string-length",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="most characters of one stop string",
)
@click.option(
    "--media-loading-thread-count",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="image downloads at once, on threads of their own",
)
@click.option(
    "--max-response-body-size",
    default="128MiB",
    show_default=True,
    help="requests whose response could be larger are refused with 400 before generating",
)
@click.option(
    "--header-read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="seconds a connection may take to send a request's headers (then it is closed)",
)
@click.option(
    "--body-read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="seconds a request's whole body may take to arrive (408 beyond)",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="connections open at once; more get a 503 and are closed",
)
@click.option(
    "--reasoning-parser",
    default=None,
    help="how the model's reasoning is told from its answer (vLLM's names: deepseek_r1, "
    "qwen3, gpt_oss, ...) [default: chosen from the chat template]",
)
@click.option(
    "--tool-call-parser",
    default=None,
    help="the model's tool-call format (hermes, mistral, llama3_json, pythonic, ...) "
    "[default: chosen from the chat template]",
)
@click.option(
    "--default-chat-template-kwargs",
    default=None,
    help="template variables for every chat request, as JSON: '{\"enable_thinking\": false}' "
    "(a request's chat_template_kwargs override them)",
)
@click.option(
    "--enable-lora-runtime-loading",
    is_flag=True,
    default=False,
    help="open POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): LoRA "
    "adapters loaded and unloaded while serving",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@_friendly_errors
@engine_options
def serve(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    served_model_name: str | None,
    chat_template: str | None,
    backend: str | None,
    revision: str | None,
    allowed_local_media_path: str | None,
    max_request_body_size: str,
    max_seqs_per_request: int,
    engine_iteration_timeout: float,
    max_stop_strings: int,
    max_stop_string_length: int,
    media_loading_thread_count: int,
    max_response_body_size: str,
    header_read_timeout: float,
    body_read_timeout: float,
    max_connections: int,
    reasoning_parser: str | None,
    tool_call_parser: str | None,
    default_chat_template_kwargs: str | None,
    enable_lora_runtime_loading: bool,
    log_level: str,
    engine_config: EngineConfig,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (see docs/serving.md)."""
    try:
        from .serve import ServerLimits, run_server
        from .serve.app import api_key_problem
        from .serve.state import default_model_name
    except ImportError as e:
        raise click.ClickException(
            f"serving needs the 'serve' extra ({e}); install it with "
            "pip install 'enginehouse[serve]'"
        ) from e
    from .pipeline import pipeline

    _check_port(host, port)  # before minutes of loading, not after
    # click takes an empty ENGINEHOUSE_API_KEY for an unset one: that would serve without
    # authentication when the operator meant to require it.
    if api_key is None and os.environ.get("ENGINEHOUSE_API_KEY") is not None:
        api_key = os.environ["ENGINEHOUSE_API_KEY"]
    if api_key is not None and not api_key.strip():
        raise click.UsageError(
            "the API key is empty (--api-key or ENGINEHOUSE_API_KEY): set a key, or unset "
            "ENGINEHOUSE_API_KEY and leave out --api-key to serve without authentication"
        )
    if api_key is not None and (problem := api_key_problem(api_key)):
        raise click.UsageError(f"--api-key or ENGINEHOUSE_API_KEY: {problem}")
    try:
        response_limit = parse_size(max_response_body_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-response-body-size") from e
    try:
        body_limit = parse_size(max_request_body_size)
        limits = ServerLimits(
            body_limit,
            max_seqs_per_request,
            engine_iteration_timeout,
            max_stop_strings=max_stop_strings,
            max_stop_string_length=max_stop_string_length,
            media_loading_thread_count=media_loading_thread_count,
            max_response_body_size=response_limit,
            header_read_timeout=header_read_timeout,
            body_read_timeout=body_read_timeout,
            max_connections=max_connections,
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-request-body-size") from e
    template_kwargs = _json_object(default_chat_template_kwargs, "--default-chat-template-kwargs")
    parsers = _parsers(reasoning_parser, tool_call_parser)  # checked before loading

    with pipeline(
        model,
        backend=backend,
        engine_config=engine_config,
        chat_template=chat_template,
        revision=revision,
    ) as pipe:
        name = served_model_name or default_model_name(pipe.spec)
        click.echo(f"serving {model} as {name!r}; {_summary_line(pipe.summary())}", err=True)
        click.echo(_parsers_line(pipe, *parsers), err=True)
        run_server(
            pipe,
            host,
            port,
            name,
            api_key,
            log_level,
            allowed_local_media_path,
            limits,
            template_kwargs,
            enable_lora_runtime_loading,
        )


def _json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint=flag) from e
    if not isinstance(value, dict):
        raise click.BadParameter(
            "give a JSON object, e.g. '{\"enable_thinking\": false}'", param_hint=flag
        )
    return value


def _parsers(reasoning: str | None, tool: str | None) -> tuple[Any, Any]:
    """The reasoning and tool-call parsers named on the command line (None: the template's)."""
    from .parsers import reasoning_parser_named, tool_parser_named

    try:
        return (
            reasoning_parser_named(reasoning) if reasoning else None,
            tool_parser_named(tool) if tool else None,
        )
    except ValueError as e:
        flag = "--reasoning-parser" if "reasoning" in str(e) else "--tool-call-parser"
        raise click.BadParameter(str(e), param_hint=flag) from e


def _parsers_line(pipe: Any, reasoning: Any, tool: Any) -> str:
    """Set the parsers named on the command line, and say which ones the server uses."""
    told = []
    for attr, parser, what in (
        ("reasoning_parser", reasoning, "reasoning parser"),
        ("tool_parser", tool, "tool-call parser"),
    ):
        if parser is not None:
            setattr(pipe, attr, parser)
            source = "as asked"
        else:
            source = "from the chat template"
        chosen = getattr(pipe, attr)
        told.append(f"{what} {chosen.name if chosen else 'none'} ({source})")
    return "; ".join(told)


def _check_port(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise click.ClickException(
                f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port "
                "(0 takes a free one) or stop what is using it"
            ) from e


def _summary_line(summary: dict[str, Any]) -> str:
    """The engine's settings as `serve` and `chat` log them at start, like vLLM does."""
    return (
        f"backend {summary['backend']}, {summary['device']} {summary['dtype']}, context "
        f"{summary['session_len']} tokens, KV cache {summary['kv_tokens']} tokens "
        f"({format_size(summary['kv_bytes'])} in {summary['kv_blocks']} blocks)"
    )


@cli.command()
@click.argument("model")
@click.option("--system", default=None, help="a system message")
@click.option("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, show_default=True)
@sampling_options
@click.option("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
@click.option("--backend", default=None, help="run on this backend (see explain)")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
@_friendly_errors
@engine_options
def chat(
    model: str,
    system: str | None,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    chat_template: str | None,
    backend: str | None,
    revision: str | None,
    engine_config: EngineConfig,
) -> None:
    """Chat with MODEL in the terminal: /reset, /system TEXT, /exit; Ctrl-C stops an answer."""
    from .chat_cli import run_chat
    from .pipeline import pipeline

    gen = _generation_config(max_new_tokens, temperature, top_p, top_k, seed)
    with pipeline(
        model,
        backend=backend,
        engine_config=engine_config,
        chat_template=chat_template,
        revision=revision,
    ) as pipe:
        click.echo(f"chatting with {model}; {_summary_line(pipe.summary())}", err=True)
        run_chat(pipe, gen, system)


@cli.command()
@click.argument("model")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="a backend to measure (repeatable) [default: the one pipeline() picks]",
)
@click.option(
    "--cases",
    default=",".join(("equal", "mixed", "single", "ttft", "startup")),
    show_default=True,
    help="comma-separated: equal, mixed, single, ttft, startup",
)
@click.option("--baseline/--no-baseline", default=True, help="also time transformers' generate")
@click.option("--quick", is_flag=True, help="4x smaller sets, one run each")
@click.option("--repeat", type=int, default=2, show_default=True, help="best of N runs")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_friendly_errors
@engine_options
def bench(
    model: str,
    backends: tuple[str, ...],
    cases: str,
    baseline: bool,
    quick: bool,
    repeat: int,
    as_json: bool,
    engine_config: EngineConfig,
) -> None:
    """Time MODEL (a local folder) against transformers' generate; each side in its own process."""
    from . import bench as benchmark
    from .pipeline import explain as explain_model

    names = [c.strip() for c in cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(benchmark.CASES))
    if unknown:
        raise click.BadParameter(f"unknown case {unknown[0]!r}; choose from {benchmark.CASES}")
    # Every backend must be able to run the model before any side (the baseline included) runs.
    for requested in backends or (None,):
        report = explain_model(model, backend=requested, engine_config=engine_config)
        if report["error"]:
            raise click.ClickException(report["error"])
        if requested is None:
            backends = (report["chosen"],)
    config = engine_config.model_dump(exclude_unset=True)
    result = benchmark.measure(model, list(backends), names, quick, repeat, config, baseline)
    rows = benchmark.report(result)
    if as_json:
        click.echo(json.dumps({**result, "rows": rows}, indent=2))
    else:
        click.echo(benchmark.format_table(rows))


@cli.command()
@click.argument("backend")
@click.option(
    "--model",
    default=None,
    metavar="DIR",
    help="a small model the backend runs [default: the first built-in one its probe accepts]",
)
@click.option(
    "--families",
    default="all",
    show_default=True,
    help="built-in families for the model checks: all, none, or a list such as llama,qwen2",
)
@click.option("--check", "checks", multiple=True, help="run only this check (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_friendly_errors
@engine_options
def conformance(
    backend: str,
    model: str | None,
    families: str,
    checks: tuple[str, ...],
    as_json: bool,
    engine_config: EngineConfig,
) -> None:
    """Check BACKEND against the runner contract and transformers: one line per check; exit
    status 1 when one fails or the kit cannot start (docs/plugins.md, "Prove your backend")."""
    from .conformance import run_conformance
    from .conformance.kit import parse_families

    report = run_conformance(
        backend,
        model,
        engine_config.model_dump(exclude_unset=True),
        parse_families(families),
        checks or None,
        on_result=None if as_json else lambda result: click.echo(result.line()),
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        if report.unclaimed:
            click.echo(f"families its probe refuses (--json says why): {report.refused()}")
        click.echo(f"{report.backend} on {report.model}: {report.summary()}")
    sys.exit(report.exit_status)


@cli.command("conformance-plugin")
@click.argument("plugin")
@click.option("--device", default="cpu", show_default=True, help="where its families run")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def conformance_plugin(plugin: str, device: str, as_json: bool) -> None:
    """Check PLUGIN's contract version, platforms, model families and logits processors: one
    line per check; exit status 1 when one fails (docs/plugins.md, "Prove your plugin")."""
    from .conformance.plugin_checks import check_plugin

    host = get_plugins()
    module = host.pm.get_plugin(plugin)
    if module is None:
        loaded = ", ".join(n for n in host.infos if host.pm.get_plugin(n) is not None)
        raise click.ClickException(f"no loaded plugin {plugin!r} (loaded: {loaded})")
    report = check_plugin(
        module, plugin, device, on_result=None if as_json else lambda r: click.echo(r.line())
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"plugin {plugin}: {report.summary()}")
    sys.exit(report.exit_status)


def _load_plugin_commands() -> None:
    for plugin, result in get_plugins().call_each("register_commands", cli=cli):
        if isinstance(result, Exception):
            click.echo(f"warning: plugin {plugin} could not add its commands: {result}", err=True)


def main(argv: list[str] | None = None) -> None:
    # Warnings (a plugin that failed to load, a kernel being built) go to stderr, one line each.
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    _load_plugin_commands()
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="enginehouse")
