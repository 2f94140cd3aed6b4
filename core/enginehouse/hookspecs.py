"""The plugin contract: every hook a plugin may implement.

These docstrings are the reference documentation of the hooks; `docs/hooks.md` repeats them
and a test fails when a hook is missing from that page or from the tests. Together with the
runner contract they are versioned as `enginehouse.CONTRACT_VERSION` (contract.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .config import EngineConfig
    from .families import ModelFamily
    from .logits_processors import LogitsProcessor
    from .multimodal import VisionEncoder
    from .platforms import Platform
    from .reasoning import ReasoningParser
    from .runner import ModelRunner, RunnerContext
    from .spec import BackendProbe, ModelFacts, ModelSpec
    from .tool_calls import ToolParser

PROJECT = "enginehouse"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def detect_architecture(spec: ModelSpec) -> ModelFacts | dict[str, Any] | None:
    """Add facts about the model described by ``spec``.

    Called on every plugin; the returned dicts are merged into ``spec.facts``. When two plugins
    give the same key, the one called first wins: plugins marked ``tryfirst`` before ordinary
    ones, and the core's own default plugin (``trylast``) last, so any plugin can refine what
    config.json says plainly. The core uses the refined ``architecture``, ``context_length`` and
    ``dtype`` (``spec.architecture``, ``spec.context_length``, ``spec.dtype``).

    The keys plugins exchange are declared by :class:`enginehouse.spec.ModelFacts`; a plugin may
    add its own. Return ``None`` when the plugin has nothing to add. Must be cheap: no weights,
    no downloads.
    """


@hookspec
def probe_backend(
    spec: ModelSpec, config: EngineConfig
) -> BackendProbe | list[BackendProbe] | None:
    """Say whether each backend this plugin offers can run the model, and why.

    Called on every plugin. Return one ``BackendProbe(name, supported, priority, reason)`` per
    backend the plugin offers (a list when it offers several), or ``None`` when it offers none.
    The core ranks the supported ones by ``priority`` (highest wins) unless the user asked for a
    backend by name, and keeps every verdict in ``pipe.backend_decision``. ``reason`` is shown to
    users by ``enginehouse explain``: say what matched, or what is missing and how to get it.

    Must be cheap: no weights loaded, no heavy imports beyond what answering needs. A probe that
    raises is reported as unsupported with its error; it never stops the other backends.
    """


@hookspec(firstresult=True)
def create_runner(
    backend: str, spec: ModelSpec, config: EngineConfig, context: RunnerContext
) -> ModelRunner | None:
    """Build the runner for ``backend`` (the chosen ``BackendProbe.name``).

    The core asks only the plugin whose probe offered the chosen backend (firstresult, should
    anything else call the hook on every plugin: return ``None`` for backends you do not own).
    ``context`` carries what the core has decided for the runner (``session_len``). The runner
    must follow :class:`enginehouse.runner.ModelRunner`, which the core checks; its weights are
    loaded afterwards by the core through ``runner.load(progress)``, so building it should be
    quick. A plugin offering several backends can answer with
    ``enginehouse.runner.build_from_table``.
    """


@hookspec(firstresult=True)
def create_vision_encoder(spec: ModelSpec, config: EngineConfig) -> VisionEncoder | None:
    """Build the image side of a vision-language model (``spec.is_vlm``).

    Called once by ``pipeline()`` for a VLM, after the runner is built; the first plugin that
    returns something wins. The encoder follows :class:`enginehouse.multimodal.VisionEncoder`:
    it loads images and runs the model's processor (``prepare``), then embeds the images on the
    language model's device (``load``, ``encode``). The engine hands those embeddings to the
    runner for the image positions (``SeqChunk.embeds``). Building it should be quick; the
    weights load in ``load``. Return ``None`` for models you do not handle.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``enginehouse`` command line.

    ``cli`` is the root ``click.Group``; use ``@cli.command()`` or ``cli.add_command(...)``.
    Called on every plugin when the CLI starts.
    """


@hookspec
def register_tool_parsers() -> list[type[ToolParser]] | None:
    """Add tool-call formats: ``ToolParser`` subclasses, each with its own ``name``.

    Called on every plugin whenever the core needs the list of formats: when a pipeline chooses
    the format of its chat template (``ToolParser.detect``, plugins' parsers asked before the
    built-in ones), and when ``--tool-call-parser NAME`` names one (a plugin's parser wins a
    name it shares with a built-in one). A parser finds the calls in an output
    (``read_calls``, with ``start`` / ``find_start`` marking where they begin) and builds the
    grammar that forces them (``constraint``, an xgrammar structural-tag format). Return the
    classes, not instances; ``None`` or an empty list adds nothing. Must be cheap.
    """


@hookspec
def register_reasoning_parsers() -> list[type[ReasoningParser]] | None:
    """Add reasoning formats: ``ReasoningParser`` subclasses, each with its own ``name``.

    Called on every plugin when a pipeline chooses the reasoning format of its chat template
    (``ReasoningParser.detect``; plugins' parsers asked first, and a template is matched only
    when exactly one parser claims it) and when ``--reasoning-parser NAME`` names one (a
    plugin's parser wins a name it shares with a built-in one). A parser whose reasoning is a
    leading block between two markers only sets ``start`` and ``end``; other formats override
    ``split`` (reasoning apart from the answer, whole or streaming) and ``constrain`` (the
    grammar that lets the reasoning through and constrains the answer). Return the classes,
    not instances. Must be cheap.
    """


@hookspec
def register_platforms() -> list[Platform] | None:
    """Declare kinds of device: ``Platform`` instances, each with its own ``name``.

    Called on every plugin, once per process, when a device name other than ``auto``,
    ``cpu`` or ``cuda`` is asked for (``EngineConfig(device="xpu")``) or the platforms are
    listed (``enginehouse plugins``, ``explain``). A platform says where its tensors live,
    how many devices it sees and their free memory (the KV cache budget), the
    torch.distributed backend of its ranks at tp > 1, its preferred dtype and whether it
    captures graphs. The core's ``cpu`` and ``cuda`` are declared through this hook by its
    default plugin; a name already taken is ignored with a warning. Must be cheap.
    """


@hookspec
def register_model_families() -> list[ModelFamily] | None:
    """Add architectures to a native backend: ``ModelFamily`` descriptions.

    Called on every plugin when the native ``pytorch`` backend looks up an architecture
    (config.json's ``architectures``): a family names the native family whose decoder it is
    (``base``), how its config reads as that family's (``config``), the switches it sets
    (``switches``) and how its checkpoint's tensor names map to the native ones
    (``weight_names``). It then runs with the native paged KV cache, batching, prefix caching
    and tensor parallelism. The backend's own families register the same way. Replaces the
    ``native_impl`` fact, deprecated in contract 1.0. Must be cheap: no weights, no torch
    models built.
    """


@hookspec
def register_logits_processors() -> list[type[LogitsProcessor]] | None:
    """Add logits processors: ``LogitsProcessor`` subclasses, each with its own ``name``.

    Called on every plugin when a request names processors
    (``GenerationConfig(logits_processors=[...])``, the server's ``logits_processors``
    field) and where sampling runs (rank 0 at tp > 1), which makes one instance of each
    processor it needs. Per step a processor is told which requests use it, with their
    ``extra_args`` (``update_state``), then changes their rows of the logits (``apply``).
    Return the classes, not instances. Must be cheap.
    """
