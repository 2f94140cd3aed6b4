"""Step 6, choosing the chat template: the tokenizer's own, an override, or a built-in one.

Real tokenizers saved by the conftest fixtures, loaded with transformers; templates rendered by
the tokenizer's own Jinja machinery.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

from enginehouse import pipeline
from enginehouse.chat_template import load_chat_template
from enginehouse.errors import EnginehouseError
from enginehouse.spec import read_model_spec

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello world"},
]
OVERRIDE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
OVERRIDE_TEXT = "[system] You are terse.\n[user] hello world\n[assistant]"
LOGGER = "enginehouse.chat_template"


@pytest.fixture(scope="module")
def chat_tok(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def base_tok(base_llama_dir):
    return AutoTokenizer.from_pretrained(base_llama_dir)


@pytest.fixture(scope="module")
def base_pipe(base_llama_dir):
    pipe = pipeline(str(base_llama_dir), progress=False)
    yield pipe
    pipe.close()


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


# --- the tokenizer's own template ---------------------------------------------------------------


def test_tokenizer_template_is_used(chat_tok, llama_dir):
    template = load_chat_template(chat_tok, read_model_spec(llama_dir))
    assert template.source == "tokenizer"
    assert template.is_builtin is False
    assert template.template == chat_tok.chat_template
    assert template.render(chat_tok, MESSAGES) == chat_tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_pipeline_wraps_a_string_in_the_tokenizers_template(llama_pipe, chat_tok, caplog):
    assert llama_pipe.chat_template.source == "tokenizer"
    expected = chat_tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert llama_pipe.encode("hello world") == list(expected)
    assert warnings_from(caplog) == []


def test_pipeline_renders_messages_with_the_tokenizers_template(llama_pipe, chat_tok):
    expected = chat_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert llama_pipe.encode(MESSAGES) == list(expected)


def test_raw_string_when_the_template_is_turned_off(llama_pipe, chat_tok):
    assert llama_pipe.encode("hello world", apply_chat_template=False) == chat_tok.encode(
        "hello world"
    )


def test_several_named_templates_use_the_default_one(llama_dir, llama_pipe):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.chat_template = {"default": OVERRIDE, "tool_use": "{{ 'tools' }}"}
    template = load_chat_template(tok, llama_pipe.spec)
    assert template.source == "tokenizer"
    assert template.template == OVERRIDE


# --- an explicit override -----------------------------------------------------------------------


def test_override_as_jinja_string_wins(chat_tok, llama_pipe):
    template = load_chat_template(chat_tok, llama_pipe.spec, OVERRIDE)
    assert template.source == "override"
    assert template.template == OVERRIDE
    assert template.render(chat_tok, MESSAGES) == OVERRIDE_TEXT


@pytest.mark.parametrize("as_path", [False, True])
def test_override_as_file_wins(chat_tok, llama_pipe, tmp_path, as_path):
    path = tmp_path / "chat.jinja"
    path.write_text(OVERRIDE, encoding="utf-8")
    template = load_chat_template(chat_tok, llama_pipe.spec, path if as_path else str(path))
    assert template.source == "override"
    assert template.template == OVERRIDE
    assert template.render(chat_tok, MESSAGES) == OVERRIDE_TEXT


def test_override_wins_over_the_builtin_without_warning(base_tok, base_llama_dir, caplog):
    template = load_chat_template(base_tok, read_model_spec(base_llama_dir), OVERRIDE)
    assert template.source == "override"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert template.render(base_tok, MESSAGES) == OVERRIDE_TEXT
    assert warnings_from(caplog) == []


def test_pipeline_with_an_override_file(llama_dir, chat_tok, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(OVERRIDE, encoding="utf-8")
    with pipeline(str(llama_dir), chat_template=path, progress=False) as pipe:
        assert pipe.chat_template.source == "override"
        assert pipe.encode(MESSAGES) == chat_tok.encode(OVERRIDE_TEXT, add_special_tokens=False)
        assert pipe.encode("hi") == chat_tok.encode(
            "[user] hi\n[assistant]", add_special_tokens=False
        )


def test_override_file_that_does_not_exist_is_an_error(chat_tok, llama_pipe, tmp_path):
    missing = tmp_path / "missing.jinja"
    with pytest.raises((EnginehouseError, FileNotFoundError), match="missing.jinja"):
        load_chat_template(chat_tok, llama_pipe.spec, missing)


# --- tokenizers without a template --------------------------------------------------------------


def test_no_template_falls_back_to_builtin_plain(base_tok, base_llama_dir):
    assert not base_tok.chat_template
    template = load_chat_template(base_tok, read_model_spec(base_llama_dir))
    assert template.source == "builtin:plain"
    assert template.is_builtin is True


def test_strings_go_in_raw_without_a_template(base_pipe, base_tok, caplog):
    assert base_pipe.chat_template.source == "builtin:plain"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert base_pipe.encode("hello world") == base_tok.encode("hello world")
    assert warnings_from(caplog) == []  # nothing was templated, so nothing to warn about


def test_messages_use_builtin_plain_with_a_warning(base_pipe, base_tok, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = base_pipe.encode(MESSAGES)
    text = "<s>System: You are terse.\nUser: hello world\nAssistant:"
    assert ids == base_tok.encode(text, add_special_tokens=False)
    assert ids.count(base_tok.bos_token_id) == 1  # the template's BOS, not a second one
    warnings = warnings_from(caplog)
    assert len(warnings) == 1
    assert "no chat template" in warnings[0]
    assert "builtin:plain" in warnings[0]
    assert "chat_template=" in warnings[0]  # says how to fix it


def test_never_chosen_from_the_folder_name(base_llama_dir, base_tok, tmp_path):
    folder = tmp_path / "qwen2-chat"
    shutil.copytree(base_llama_dir, folder)
    spec = read_model_spec(folder)
    assert spec.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(folder)
    assert load_chat_template(tok, spec).source == "builtin:plain"
    with pipeline(str(folder), progress=False) as pipe:
        assert pipe.chat_template.source == "builtin:plain"


def test_builtin_is_chosen_by_model_type(base_llama_dir, base_tok, tmp_path):
    # A qwen2 config without a tokenizer template gets ChatML, whatever the folder is called.
    folder = tmp_path / "llama-base"
    folder.mkdir()
    config = json.loads((base_llama_dir / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    template = load_chat_template(base_tok, read_model_spec(folder))
    assert template.source == "builtin:chatml"
    rendered = template.render(base_tok, MESSAGES[1:])
    assert rendered == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_render_without_generation_prompt(base_tok, base_llama_dir):
    template = load_chat_template(base_tok, read_model_spec(base_llama_dir))
    text = template.render(base_tok, MESSAGES[1:], add_generation_prompt=False)
    assert text == "<s>User: hello world\n"
