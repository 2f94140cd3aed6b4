"""Step 3, merging every plugin's facts about the model, on real plugin hosts."""

from __future__ import annotations

import logging

import pytest

from enginehouse import hookimpl
from enginehouse.detect import detect_architecture
from enginehouse.plugins import load_plugins
from enginehouse.spec import read_model_spec


@pytest.fixture(scope="module")
def llama_spec(llama_dir):
    return read_model_spec(llama_dir)


@pytest.fixture
def default_only():
    """A fresh host with only the core's default plugin."""
    return load_plugins(only="")


class Facts:
    """A plugin object whose detect_architecture returns fixed facts."""

    def __init__(self, facts):
        self.facts = facts

    @hookimpl
    def detect_architecture(self, spec):
        return self.facts


class FirstFacts(Facts):
    @hookimpl(tryfirst=True)
    def detect_architecture(self, spec):
        return self.facts


class Raises:
    @hookimpl
    def detect_architecture(self, spec):
        raise KeyError("vision_tower")


def test_default_plugin_facts(llama_spec, default_only):
    spec = detect_architecture(llama_spec, default_only)
    assert dict(spec.facts) == {
        "architecture": "LlamaForCausalLM",
        "family": "llama",
        "is_vlm": False,
        "context_length": 256,
        "dtype": "float32",
        "trust_remote_code_needed": False,
    }
    assert spec.is_vlm is False


def test_detect_returns_a_new_spec(llama_spec, default_only):
    spec = detect_architecture(llama_spec, default_only)
    assert spec is not llama_spec
    assert dict(llama_spec.facts) == {}
    assert spec.config is llama_spec.config  # the files are not read again
    assert spec.weight_files == llama_spec.weight_files


def test_installed_plugins_add_nothing_for_a_plain_llm(llama_spec, default_only):
    alone = detect_architecture(llama_spec, default_only).facts
    together = detect_architecture(llama_spec, load_plugins()).facts
    assert dict(together) == dict(alone)


def test_every_family_gets_its_facts(tiny_models):
    host = load_plugins()
    for family, folder in tiny_models.items():
        facts = detect_architecture(read_model_spec(folder), host).facts
        assert facts["family"] == family
        assert facts["architecture"].lower().startswith(family)
        assert facts["context_length"] == 256


def test_a_plugin_called_first_wins_a_key(llama_spec, default_only):
    default_only.register(FirstFacts({"family": "llama-custom", "native_impl": "mine"}), "first")
    facts = detect_architecture(llama_spec, default_only).facts
    assert facts["family"] == "llama-custom"
    assert facts["native_impl"] == "mine"
    # Keys it did not give still come from the default plugin.
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["context_length"] == 256


def test_an_ordinary_plugin_beats_the_trylast_default(llama_spec, default_only):
    default_only.register(Facts({"context_length": 128}), "plain")
    assert detect_architecture(llama_spec, default_only).facts["context_length"] == 128


def test_tryfirst_beats_an_ordinary_plugin(llama_spec, default_only):
    # Registered in the order that would favour the ordinary one if tryfirst were ignored.
    default_only.register(FirstFacts({"family": "from-tryfirst"}), "first")
    default_only.register(Facts({"family": "from-ordinary", "extra": 1}), "ordinary")
    facts = detect_architecture(llama_spec, default_only).facts
    assert facts["family"] == "from-tryfirst"
    assert facts["extra"] == 1


def test_none_values_do_not_hide_later_answers(llama_spec, default_only):
    default_only.register(FirstFacts({"family": None, "is_vlm": False}), "first")
    facts = detect_architecture(llama_spec, default_only).facts
    assert facts["family"] == "llama"


def test_plugin_returning_none_adds_nothing(llama_spec, default_only):
    before = dict(detect_architecture(llama_spec, default_only).facts)
    default_only.register(FirstFacts(None), "nothing")
    default_only.register(Facts({}), "empty")
    assert dict(detect_architecture(llama_spec, default_only).facts) == before


def test_a_plugin_that_raises_is_logged_and_the_others_kept(llama_spec, default_only, caplog):
    default_only.register(Raises(), "faulty")
    default_only.register(Facts({"native_impl": "llama"}), "good")
    with caplog.at_level(logging.WARNING, logger="enginehouse.detect"):
        facts = detect_architecture(llama_spec, default_only).facts
    assert facts["family"] == "llama"
    assert facts["native_impl"] == "llama"
    messages = [r.getMessage() for r in caplog.records if r.name == "enginehouse.detect"]
    assert any("faulty" in m and "vision_tower" in m for m in messages), messages


class Wrapper:
    @hookimpl(wrapper=True)
    def detect_architecture(self, spec):
        facts = yield
        return facts


def test_a_hook_wrapper_does_not_break_detection(llama_spec, default_only):
    default_only.register(Wrapper(), "wrapper")
    facts = detect_architecture(llama_spec, default_only).facts
    assert facts["family"] == "llama"


def test_the_core_uses_a_plugins_refined_facts(llama_spec, default_only, llama_dir):
    from enginehouse import EngineConfig
    from enginehouse.runner import session_length

    default_only.register(FirstFacts({"context_length": 128, "dtype": "bfloat16"}), "refiner")
    spec = detect_architecture(llama_spec, default_only)
    assert (spec.context_length, spec.dtype) == (128, "bfloat16")
    assert session_length(spec, EngineConfig()) == 128  # the engine's default context follows
    default_only.register(FirstFacts({"architecture": "MistralForCausalLM"}), "renamer")
    assert detect_architecture(llama_spec, default_only).architecture == "MistralForCausalLM"
    assert llama_spec.architecture == "LlamaForCausalLM"  # the spec read from disk is unchanged


def test_model_facts_declares_every_key_the_bundled_plugins_give(llama_spec, tmp_path):
    from typing import get_type_hints

    from enginehouse.spec import ModelFacts, read_model_spec

    declared = set(get_type_hints(ModelFacts))
    assert set(detect_architecture(llama_spec, load_plugins()).facts) <= declared
    vlm = tmp_path / "llava"
    vlm.mkdir()
    (vlm / "config.json").write_text(
        '{"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", '
        '"vision_config": {"model_type": "clip_vision_model"}, '
        '"text_config": {"model_type": "llama"}}'
    )
    facts = detect_architecture(read_model_spec(vlm), load_plugins()).facts
    assert "vision_encoder" in facts and set(facts) <= declared
