"""Step 1, resolving a model identifier, tested on real folders and a real offline hub cache.

The hub cache is laid out the way huggingface_hub writes it (``models--org--name/refs/<ref>``
holding a commit hash, ``snapshots/<hash>/`` with links into ``blobs/``), and
``huggingface_hub.snapshot_download`` itself reads it in offline mode; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from enginehouse.errors import ModelNotFoundError
from enginehouse.resolve import resolve_model
from enginehouse.spec import read_model_spec

REPO = "tinyorg/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs=("main",)) -> Path:
    """Put the files of `source` into `cache` as huggingface_hub's cache layout has them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as the hub writes it
    return snapshot


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, llama_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    add_snapshot(cache, REPO, COMMIT, llama_dir)
    return cache


# --- local folders ------------------------------------------------------------------------------


def test_local_folder_resolves_as_it_is(llama_dir):
    resolved = resolve_model(str(llama_dir))
    assert resolved.path == llama_dir.resolve()
    assert resolved.model_id == str(llama_dir)
    assert resolved.from_hub is False
    assert resolved.revision is None


def test_local_folder_as_pathlike_and_relative(llama_dir, monkeypatch):
    monkeypatch.chdir(llama_dir.parent)
    resolved = resolve_model(Path(".") / llama_dir.name)
    assert resolved.path == llama_dir.resolve()
    assert resolved.path.is_absolute()
    assert resolved.from_hub is False


def test_local_folder_that_looks_like_a_hub_id(tmp_path, llama_dir, monkeypatch):
    # An existing folder "org/name" under the working directory is a folder, not a hub id.
    shutil.copytree(llama_dir, tmp_path / "someorg" / "somemodel")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("someorg/somemodel")
    assert resolved.from_hub is False
    assert resolved.path == (tmp_path / "someorg" / "somemodel").resolve()


@pytest.mark.parametrize("identifier", ["./no-such-model", "../no/such/model", "a/b/c"])
def test_missing_folder_is_a_clear_error(identifier, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(identifier)
    message = str(info.value)
    assert identifier in message
    assert "does not exist" in message


def test_missing_absolute_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)


def test_error_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nothing-here"))


def test_a_file_is_not_a_model_folder(llama_dir):
    weights = llama_dir / "model.safetensors"
    with pytest.raises(ModelNotFoundError, match="is a file") as info:
        resolve_model(str(weights))
    assert str(weights) in str(info.value)


# --- hub ids, offline ---------------------------------------------------------------------------


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path):
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=empty_cache)
    message = str(info.value)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "not in the local cache" in message
    assert "offline" in message
    assert str(empty_cache) in message  # says where it looked
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in message  # and how to fix it


def test_bare_name_that_is_neither_a_folder_nor_cached_says_the_folder_is_missing(tmp_path):
    # "gpt2"-style ids without an org are still looked up in the hub cache, but a bare name
    # found nowhere is most likely a mistyped folder: say so, do not suggest a download.
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-dir", cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("model folder 'no-such-dir' does not exist; check the path")
    assert "hf download" not in message


def test_bare_name_found_in_the_hub_cache_resolves(tmp_path, llama_dir):
    cache = tmp_path / "cache"
    snapshot = add_snapshot(cache, "gpt2", COMMIT, llama_dir)
    assert resolve_model("gpt2", cache_dir=cache).path == snapshot


def test_cached_hub_id_resolves_offline_to_its_snapshot(hub_cache):
    resolved = resolve_model(REPO, cache_dir=hub_cache)
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert resolved.path == snapshot
    assert resolved.from_hub is True
    assert resolved.model_id == REPO
    assert resolved.revision is None
    assert (resolved.path / "config.json").is_file()


def test_cached_snapshot_reads_as_a_model(hub_cache, llama_dir):
    resolved = resolve_model(REPO, cache_dir=hub_cache)
    spec = read_model_spec(resolved.path, resolved.model_id)
    local = read_model_spec(llama_dir)
    assert spec.model_id == REPO
    assert spec.weight_files == local.weight_files
    assert spec.weight_bytes == local.weight_bytes  # sizes of the blobs behind the links
    assert spec.tokenizer_files == local.tokenizer_files
    assert dict(spec.config) == dict(local.config)


def test_cached_revision_by_commit_hash(tmp_path, llama_dir, base_llama_dir):
    # main points at one commit; an older commit is still in the cache and chosen by hash.
    cache = tmp_path / "cache"
    main = add_snapshot(cache, REPO, COMMIT, llama_dir)
    older = add_snapshot(cache, REPO, OTHER_COMMIT, base_llama_dir, refs=())
    assert resolve_model(REPO, cache_dir=cache).path == main
    resolved = resolve_model(REPO, revision=OTHER_COMMIT, cache_dir=cache)
    assert resolved.path == older
    assert resolved.revision == OTHER_COMMIT
    assert resolve_model(REPO, revision=COMMIT, cache_dir=cache).path == main


def test_cached_revision_by_branch_name(tmp_path, llama_dir):
    cache = tmp_path / "cache"
    snapshot = add_snapshot(cache, REPO, COMMIT, llama_dir, refs=("main", "v1.0"))
    assert resolve_model(REPO, revision="v1.0", cache_dir=cache).path == snapshot
    assert resolve_model(REPO, revision="main", cache_dir=cache).path == snapshot


def test_uncached_revision_is_a_clear_error_naming_the_revision(hub_cache):
    with pytest.raises(ModelNotFoundError, match="not in the local cache") as info:
        resolve_model(REPO, revision=OTHER_COMMIT, cache_dir=hub_cache)
    assert f"{REPO!r} at revision {OTHER_COMMIT!r} is not in the local cache" in str(info.value)
    assert f"hf download {REPO} --revision {OTHER_COMMIT}" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="at revision 'no-such-branch'"):
        resolve_model(REPO, revision="no-such-branch", cache_dir=hub_cache)


def test_hf_hub_cache_environment_variable_is_honoured(hub_cache):
    # huggingface_hub reads HF_HUB_CACHE when it is imported, so a fresh interpreter it is.
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    env.pop("HF_HOME", None)
    code = (
        "from enginehouse.resolve import resolve_model\n"
        f"r = resolve_model({REPO!r})\n"
        "print(r.path)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    )


def test_pipeline_runs_a_cached_hub_model_offline(hub_cache, llama_pipe):
    from enginehouse import pipeline

    gen = {"max_new_tokens": 4, "ignore_eos": True}
    with pipeline(REPO, cache_dir=hub_cache, progress=False) as pipe:
        assert pipe.spec.model_id == REPO
        assert (
            pipe.spec.path
            == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
        )
        response = pipe("hello world", gen)
        assert response.generate_token_len == 4
        assert response.text
    # The same weights as the local folder, so greedy decoding gives the same tokens.
    assert response.token_ids == llama_pipe("hello world", gen).token_ids


def test_read_spec_records_the_revision(hub_cache):
    from enginehouse.pipeline import read_spec

    spec = read_spec(REPO, revision=COMMIT, cache_dir=hub_cache)
    assert spec.model_id == REPO
    assert spec.revision == COMMIT
    assert spec.path.name == COMMIT
    assert spec.facts["family"] == "llama"


def test_explain_a_cached_hub_model_offline(hub_cache):
    from enginehouse import explain

    info = explain(REPO, revision=COMMIT, cache_dir=hub_cache)
    assert info["model"] == REPO
    assert Path(info["path"]).name == COMMIT
    assert info["chosen"] == "pytorch"
