"""Step 2, reading a model folder once into a frozen `ModelSpec`, on real files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from enginehouse.errors import InvalidModelError
from enginehouse.spec import ModelSpec, read_model_spec

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def write_folder(folder: Path, config: dict | str | bytes | None = None, **files) -> Path:
    """A model folder with config.json (a dict as JSON, text or bytes as given) and `files`."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        if isinstance(config, dict):
            config = json.dumps(config)
        if isinstance(config, str):
            config = config.encode()
        (folder / "config.json").write_bytes(config)
    for name, content in files.items():
        name = name.replace("__", ".")
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (folder / name).write_bytes(data)
    return folder


def test_reads_everything_once(llama_dir):
    spec = read_model_spec(llama_dir)
    assert isinstance(spec, ModelSpec)
    assert spec.model_id == str(llama_dir)
    assert spec.path == llama_dir
    assert spec.revision is None
    # config.json
    assert spec.config["model_type"] == "llama"
    assert spec.config["hidden_size"] == 64
    assert spec.architectures == ("LlamaForCausalLM",)
    assert spec.architecture == "LlamaForCausalLM"
    assert spec.model_type == "llama"
    # generation_config.json
    assert spec.generation_config["do_sample"] is False
    assert spec.generation_config["eos_token_id"] == 2
    # tokenizer files, in the order of TOKENIZER_FILES, only those present
    assert set(spec.tokenizer_files) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    # weights
    assert spec.weight_files == ("model.safetensors",)
    assert spec.weight_bytes == (llama_dir / "model.safetensors").stat().st_size > 0
    assert spec.dtype == "float32"
    assert spec.context_length == 256
    assert dict(spec.facts) == {}
    assert spec.is_vlm is False


def test_model_id_and_revision_are_kept(llama_dir):
    spec = read_model_spec(llama_dir, model_id="org/name", revision="abc")
    assert spec.model_id == "org/name"
    assert spec.revision == "abc"
    assert spec.path == llama_dir


def test_spec_is_frozen(llama_dir):
    spec = read_model_spec(llama_dir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dtype = "float16"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.facts = {"x": 1}  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.config["model_type"] = "mistral"  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.generation_config["do_sample"] = True  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.facts["x"] = 1  # type: ignore[index]


def test_with_facts_returns_a_frozen_copy(llama_dir):
    spec = read_model_spec(llama_dir)
    facts = {"family": "llama"}
    updated = spec.with_facts(facts)
    assert updated is not spec
    assert dict(spec.facts) == {}
    assert updated.facts["family"] == "llama"
    facts["family"] = "changed"  # the caller's dict is copied, not shared
    assert updated.facts["family"] == "llama"
    with pytest.raises(TypeError):
        updated.facts["family"] = "x"  # type: ignore[index]
    assert updated.with_facts({"is_vlm": True}).is_vlm is True


def test_config_without_architectures(tmp_path):
    folder = write_folder(tmp_path / "m", {"model_type": "llama"})
    with pytest.raises(InvalidModelError) as info:
        read_model_spec(folder)
    message = str(info.value)
    assert str(folder / "config.json") in message
    assert "add one" in message
    assert '"architectures"' in message


@pytest.mark.parametrize("architectures", [[], "LlamaForCausalLM", None])
def test_config_with_empty_or_wrong_architectures(tmp_path, architectures):
    folder = write_folder(tmp_path / "m", {"architectures": architectures, "model_type": "x"})
    with pytest.raises(InvalidModelError, match="architectures"):
        read_model_spec(folder)


def test_folder_without_config(tmp_path, llama_dir):
    folder = tmp_path / "no-config"
    shutil.copytree(llama_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(InvalidModelError, match="has no config.json") as info:
        read_model_spec(folder)
    assert str(folder) in str(info.value)


def test_invalid_json(tmp_path):
    folder = write_folder(tmp_path / "m", '{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(InvalidModelError, match="is not valid JSON") as info:
        read_model_spec(folder)
    assert str(folder / "config.json") in str(info.value)


def test_invalid_generation_config_json(tmp_path):
    folder = write_folder(tmp_path / "m", LLAMA_CONFIG, generation_config__json=b"{nope")
    with pytest.raises(InvalidModelError, match="generation_config.json is not valid JSON"):
        read_model_spec(folder)


def test_json_that_is_not_an_object(tmp_path):
    folder = write_folder(tmp_path / "m", '["LlamaForCausalLM"]')
    with pytest.raises(InvalidModelError, match="must hold a JSON object, not list"):
        read_model_spec(folder)


def test_config_that_is_not_utf8(tmp_path):
    folder = write_folder(tmp_path / "m", b'{"architectures": ["\xff\xfe"]}')
    with pytest.raises(InvalidModelError, match="config.json"):
        read_model_spec(folder)


def test_missing_generation_config_is_empty(tmp_path):
    spec = read_model_spec(write_folder(tmp_path / "m", LLAMA_CONFIG))
    assert dict(spec.generation_config) == {}
    assert spec.weight_files == ()
    assert spec.weight_bytes == 0
    assert spec.tokenizer_files == ()
    assert spec.context_length is None
    assert spec.dtype == "float32"  # no dtype in config.json: the transformers default


def test_only_known_tokenizer_files_are_listed(tmp_path):
    folder = write_folder(
        tmp_path / "m",
        LLAMA_CONFIG,
        tokenizer__model=b"\x00sentencepiece",
        vocab__json={"a": 0},
        merges__txt=b"#version: 0.2\n",
        special_tokens_map__json={},
        chat_template__json={"chat_template": "{{ x }}"},
        notes__txt=b"not a tokenizer file",
    )
    spec = read_model_spec(folder)
    assert spec.tokenizer_files == (
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "chat_template.json",
    )


def _shards(folder: Path) -> dict[str, int]:
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.zeros(8, 8)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.ones(4, 4, dtype=torch.float16)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 8 * 8 * 4 + 4 * 4 * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {name: (folder / name).stat().st_size for name in shards}


def test_sharded_weights_are_all_listed(tmp_path):
    folder = write_folder(tmp_path / "m", dict(LLAMA_CONFIG, torch_dtype="bfloat16"))
    sizes = _shards(folder)
    spec = read_model_spec(folder)
    assert spec.weight_files == tuple(sorted(sizes))
    assert spec.weight_bytes == sum(sizes.values())
    assert spec.dtype == "bfloat16"  # the older torch_dtype key is read too


def test_index_decides_which_safetensors_are_the_weights(tmp_path):
    folder = write_folder(tmp_path / "m", LLAMA_CONFIG)
    sizes = _shards(folder)
    save_file({"a.weight": torch.zeros(8, 8)}, folder / "consolidated.safetensors")
    spec = read_model_spec(folder)
    assert spec.weight_files == tuple(sorted(sizes))
    assert spec.weight_bytes == sum(sizes.values())


def test_safetensors_preferred_over_pickles(tmp_path):
    folder = write_folder(tmp_path / "m", LLAMA_CONFIG, pytorch_model__bin=b"x" * 10)
    save_file({"a": torch.zeros(2)}, folder / "model.safetensors")
    spec = read_model_spec(folder)
    assert spec.weight_files == ("model.safetensors",)
    assert spec.weight_bytes == (folder / "model.safetensors").stat().st_size


def test_pickle_weights_without_training_state(tmp_path):
    folder = write_folder(
        tmp_path / "m", LLAMA_CONFIG, pytorch_model__bin=b"x" * 10, training_args__bin=b"y" * 3
    )
    spec = read_model_spec(folder)
    assert spec.weight_files == ("pytorch_model.bin",)
    assert spec.weight_bytes == 10


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"max_position_embeddings": 4096}, 4096),
        ({"n_positions": 1024}, 1024),
        ({"max_sequence_length": 2048}, 2048),
        ({"seq_length": 8192}, 8192),
        ({"max_position_embeddings": 0, "n_positions": 512}, 512),
        ({"text_config": {"max_position_embeddings": 32768}}, 32768),
        ({}, None),
    ],
)
def test_context_length(tmp_path, extra, expected):
    spec = read_model_spec(write_folder(tmp_path / "m", dict(LLAMA_CONFIG, **extra)))
    assert spec.context_length == expected


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({"text_config": {"torch_dtype": "bfloat16"}}, "bfloat16"),
        ({"dtype": None, "text_config": {"dtype": "bfloat16"}}, "bfloat16"),
    ],
)
def test_dtype(tmp_path, extra, expected):
    spec = read_model_spec(write_folder(tmp_path / "m", dict(LLAMA_CONFIG, **extra)))
    assert spec.dtype == expected


def test_every_tiny_model_reads(tiny_models):
    for family, folder in tiny_models.items():
        spec = read_model_spec(folder)
        assert spec.model_type == family
        assert spec.context_length == 256
        assert spec.weight_files == ("model.safetensors",)
