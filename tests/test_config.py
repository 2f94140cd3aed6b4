"""GenerationConfig and EngineConfig: defaults, parsing, and clear errors for bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from enginehouse import EngineConfig, GenerationConfig
from enginehouse.config import parse_size
from enginehouse.errors import describe_validation_error


def test_sizes_and_fractions():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512 MB") == 512 * 10**6
    assert EngineConfig(kv_cache_memory="1.5GiB").kv_cache_memory == int(1.5 * 2**30)
    assert EngineConfig(kv_cache_memory=0.5).kv_cache_memory == 0.5
    assert EngineConfig(kv_cache_memory=2**30).kv_cache_memory == 2**30
    assert EngineConfig.coerce({"max_batch_size": 4}).max_batch_size == 4


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kv_cache_memory": 1.5}, "fraction must be in (0, 1]"),
        ({"kv_cache_memory": "lots"}, "cannot read 'lots' as a size"),
        ({"kv_cache_memory": 1}, "read as 1 bytes"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "float8"}, "dtype"),
        ({"max_batch_size": 64, "max_num_batched_tokens": 32}, "at least max_batch_size"),
        ({"max_batch_sizes": 1}, "max_batch_sizes"),
    ],
)
def test_bad_engine_config(fields, message):
    with pytest.raises(ValidationError) as info:
        EngineConfig(**fields)
    assert message in describe_validation_error(info.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens (9) is larger"),
        ({"stop_words": [""]}, "empty string"),
        ({"logprobs": 50}, "logprobs"),
        ({"tempreature": 0.5}, "tempreature"),
    ],
)
def test_bad_generation_config(fields, message):
    with pytest.raises(ValidationError) as info:
        GenerationConfig(**fields)
    text = describe_validation_error(info.value)
    assert message in text and "pydantic" not in text


def test_model_defaults_fill_only_unset_fields():
    model = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": 2}
    filled = GenerationConfig(max_new_tokens=5).with_model_defaults(model)
    assert (filled.do_sample, filled.temperature, filled.top_p) == (True, 0.7, 0.8)
    assert filled.max_new_tokens == 5
    explicit = GenerationConfig(do_sample=False, top_p=1.0).with_model_defaults(model)
    assert (explicit.do_sample, explicit.temperature, explicit.top_p) == (False, 0.7, 1.0)
    assert explicit.greedy


def test_single_stop_word_string_is_accepted():
    assert GenerationConfig(stop_words="###").stop_words == ["###"]
