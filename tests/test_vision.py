"""Vision-language models through `pipeline()`, checked against transformers' own `generate`.

Small random-weight LLaVA and LLaVA-NeXT models with real processors are built offline
(`enginehouse.testing.build_vlm`); images are generated pixels saved as real PNG files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from enginehouse import GenerationConfig, explain, hookimpl, pipeline
from enginehouse.errors import RequestError
from enginehouse.plugins import get_plugins
from enginehouse.testing import build_qwen_vl, build_vlm, tight_kv_config

LLAVA = ["llava", "llava_next"]
QWEN = ["qwen2_vl", "qwen2_5_vl"]
FAMILIES = LLAVA + QWEN


def picture(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    built = {f: build_vlm(tmp_path_factory.mktemp(f), f) for f in LLAVA}
    return built | {f: build_qwen_vl(tmp_path_factory.mktemp(f), f) for f in QWEN}


@pytest.fixture(scope="module")
def pipes(vlm_dirs):
    opened = {f: pipeline(str(p), progress=False) for f, p in vlm_dirs.items()}
    yield opened
    for pipe in opened.values():
        pipe.close()


@pytest.fixture(scope="module")
def hf_models(vlm_dirs):
    loaded = {}
    for family, path in vlm_dirs.items():
        cls = tf.AutoModelForImageTextToText
        model = cls.from_pretrained(path, dtype=torch.float32).eval()
        # Qwen2-VL's full processor needs torchvision (for videos): its image processor and
        # tokenizer are used as the processor uses them (see qwen_inputs).
        auto = tf.AutoProcessor if family in LLAVA else tf.AutoImageProcessor
        loaded[family] = (model, auto.from_pretrained(path), tf.AutoTokenizer.from_pretrained(path))
    return loaded


def qwen_inputs(image_processor, tokenizer, text: str, images: list) -> dict:
    """What Qwen2VLProcessor makes: each <|image_pad|> repeated once per 2x2 patches."""
    inputs = dict(image_processor(images=images, return_tensors="pt"))
    for grid in inputs["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    ids = tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False)
    input_ids = torch.tensor([ids["input_ids"]])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return inputs | {"input_ids": input_ids, "mm_token_type_ids": (input_ids == image_id).int()}


def hf_greedy(hf_models, family: str, text: str, images: list, n: int) -> tuple[list, list]:
    """transformers' prompt ids and greedy tokens for a templated text with images."""
    model, processor, tokenizer = hf_models[family]
    if family in LLAVA:
        inputs = processor(
            text=[text], images=images, add_special_tokens=False, return_tensors="pt"
        )
    else:
        inputs = qwen_inputs(processor, tokenizer, text, images)
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    ids = inputs["input_ids"][0].tolist()
    return ids, out[0, len(ids) :].tolist()


def templated(pipe, question: str, num_images: int = 1) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return pipe.chat_template.render(pipe.tokenizer, [{"role": "user", "content": content}])


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_names_the_encoder_and_the_text_model(family, vlm_dirs):
    info = explain(vlm_dirs[family])
    assert info["chosen"] == "pytorch"
    facts = info["facts"]
    assert facts["is_vlm"] and facts["vision_encoder"] == family
    text_model = "LlamaForCausalLM" if family in LLAVA else "Qwen2ForCausalLM"
    assert facts["text_architecture"] == text_model
    reasons = {v["backend"]: v["reason"] for v in info["verdicts"]}
    assert f"images through the {family} encoder" in reasons["pytorch"]
    assert "takes text only" in reasons["transformers"]


def test_explain_command_names_encoder_and_text_model(vlm_dirs):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    result = CliRunner().invoke(cli, ["explain", str(vlm_dirs["qwen2_vl"])])
    assert result.exit_code == 0, result.output
    line = "vision model: yes: images by the qwen2_vl encoder, text by Qwen2ForCausalLM"
    assert line in result.output


def test_an_unknown_vlm_is_reported_unsupported_with_the_reason(tmp_path):
    config = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "vision_config": {"hidden_size": 32},
        "text_config": {"model_type": "llama"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # explain loads no weights
    info = explain(tmp_path)
    assert info["chosen"] is None
    reasons = {v["backend"]: v["reason"] for v in info["verdicts"]}
    assert "no image encoder for Idefics3ForConditionalGeneration" in reasons["pytorch"]
    assert (
        "known: " in reasons["pytorch"] and "Qwen2VLForConditionalGeneration" in reasons["pytorch"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_alone_and_batched_with_text(family, pipes, hf_models):
    pipe = pipes[family]
    image, wide = picture(0), picture(1, (40, 100))
    question = "describe the picture"
    text = templated(pipe, question)
    ids, expected = hf_greedy(hf_models, family, text, [image], 12)
    alone = pipe((question, image), fixed(12))
    assert pipe.encode((question, image)) == ids  # placeholders expanded as the processor does
    assert alone.token_ids == expected and alone.input_token_len == len(ids)
    _, expected_wide = hf_greedy(hf_models, family, text, [wide], 9)
    two = templated(pipe, "compare them", 2)
    _, expected_two = hf_greedy(hf_models, family, two, [image, wide], 6)
    text_only = pipe("hello world the quick brown fox", fixed(10))
    batch = pipe(
        [
            "hello world the quick brown fox",
            (question, wide),
            (question, image),
            ("compare them", [image, wide]),
        ],
        [fixed(10), fixed(9), fixed(12), fixed(6)],
    )
    assert [r.token_ids for r in batch] == [
        text_only.token_ids,
        expected_wide,
        expected,
        expected_two,
    ]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_split_across_chunks_and_recomputed_after_preemption(family, pipes, vlm_dirs):
    """Chunked prefill cuts the image tokens between steps; a KV cache so small that requests
    are preempted recomputes them from the kept embeddings (and, for Qwen2-VL, the kept
    multimodal positions). Tokens stay the same."""
    prompts = [(f"picture number {i}", picture(20 + i)) for i in range(3)]
    expected = [r.token_ids for r in pipes[family](prompts, fixed(20))]
    session, block = 80, 4
    config = dict(
        tight_kv_config(pipes[family], session, block, num_blocks=session // block + 2),
        max_num_batched_tokens=16,  # the smallest: the 16 image tokens span two chunks
        max_batch_size=4,
    )
    with pipeline(str(vlm_dirs[family]), engine_config=config, progress=False) as pipe:
        out = pipe(prompts, fixed(20))
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in out] == expected
    assert stats["kv_blocks_used"] == 0


class CountingEncoders:
    """A plugin that supplies the encoder itself (ahead of the vision plugin) and records the
    size of every batch the engine hands it."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    @hookimpl(tryfirst=True)
    def create_vision_encoder(self, spec, config):
        from enginehouse_vision.encoder import HFVisionEncoder

        batches = self.batches

        class Counting(HFVisionEncoder):
            def encode(self, batch):
                batches.append(len(batch))
                return super().encode(batch)

        return Counting(spec, config)


def test_requests_admitted_together_are_encoded_in_one_batch(vlm_dirs):
    plugin = CountingEncoders()
    host = get_plugins()
    host.register(plugin, "counting-encoders")
    try:
        pipe = pipeline(str(vlm_dirs["llava_next"]), progress=False)
    finally:
        host.pm.unregister(name="counting-encoders")
    with pipe:
        prompts = [
            pipe.prepare((f"picture {i}", picture(30 + i, (50 + 20 * i, 60)))) for i in range(3)
        ]
        engine = pipe.engine.engine

        def run_all() -> list:
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", p.token_ids, fixed(5), mm=p.mm)
            tokens: dict[str, list[int]] = {}
            while engine.has_work():
                for out in engine.step():
                    tokens.setdefault(out.request_id, []).extend(out.token_ids)
            return tokens

        finished = pipe.engine.call(run_all)
        alone = [
            pipe((f"picture {i}", picture(30 + i, (50 + 20 * i, 60))), fixed(5)) for i in range(3)
        ]
    assert plugin.batches[0] == 3  # one batch for the three requests of the first step
    assert [finished[f"r{i}"] for i in range(3)] == [r.token_ids for r in alone]


def test_messages_with_image_parts_from_every_source(pipes, tmp_path):
    pipe = pipes["llava"]
    image = picture(2)
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes(image))
    expected = pipe(("what is this?", image), fixed(8)).token_ids
    sources = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "image_url", "image_url": {"url": path.as_uri()}},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": png_bytes(image)},
    ]
    for part in sources:
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "what is this?"}]}]
        assert pipe(messages, fixed(8)).token_ids == expected, part["type"]


def test_string_template_gets_placeholders_in_the_text(tmp_path):
    from enginehouse.testing import CHATML_TEMPLATE

    folder = build_vlm(tmp_path / "chatml", "llava", chat_template=CHATML_TEMPLATE)
    with pipeline(str(folder), progress=False) as pipe:
        assert not pipe.chat_template.reads_parts(pipe.tokenizer)
        ids = pipe.encode(("what is this?", picture(3)))
        assert ids.count(pipe.vision.image_token_id) == 16
        text = pipe.tokenizer.decode(ids)
        assert text.startswith("<|im_start|>user\n<image>") and "what is this?" in text


def test_a_template_kept_by_the_processor_is_used(vlm_dirs, tmp_path):
    """Older llava-hf checkpoints keep the chat template in chat_template.json only."""
    import shutil

    folder = shutil.copytree(vlm_dirs["llava"], tmp_path / "llava-old")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    with pipeline(str(folder), progress=False) as pipe:
        assert pipe.chat_template.source == "processor"
        assert pipe.chat_template.template == template
    assert pipe.vision.model is None  # closing the pipeline frees the vision tower too


HUB_LAYOUT = [("vision_tower.", "vision_tower.vision_model.")]  # llava-hf on the hub
NEW_LAYOUT = [  # transformers 5's module names
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


QWEN_NEW_LAYOUT = [("model.", "model.language_model."), ("visual.", "model.visual.")]


@pytest.mark.parametrize(
    "family, renames",
    [("llava", HUB_LAYOUT), ("llava", NEW_LAYOUT), ("qwen2_vl", QWEN_NEW_LAYOUT)],
    ids=["llava-hub", "llava-transformers5", "qwen2_vl-transformers5"],
)
def test_other_checkpoint_layouts_load_the_same_model(family, renames, pipes, vlm_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(vlm_dirs[family], tmp_path / "renamed")
    tensors = load_file(folder / "model.safetensors")

    def renamed(key: str) -> str:
        return next((new + key[len(old) :] for old, new in renames if key.startswith(old)), key)

    save_file({renamed(k): v for k, v in tensors.items()}, folder / "model.safetensors")
    prompt = ("what is this?", picture(12))
    expected = pipes[family](prompt, fixed(8)).token_ids
    with pipeline(str(folder), progress=False) as pipe:
        assert pipe(prompt, fixed(8)).token_ids == expected


def test_prefix_cache_never_shares_blocks_of_different_images(pipes):
    pipe = pipes["llava"]
    question = "the same words " * 8  # text blocks after the image that would match
    first = pipe((question, picture(10)), fixed(8))
    again = pipe((question, picture(10)), fixed(8))
    other = pipe((question, picture(11)), fixed(8))
    assert again.token_ids == first.token_ids and again.cached_tokens > 16
    assert other.token_ids != first.token_ids
    # Only the blocks before the image (the template's head) may be shared.
    image_start = pipe.encode((question, picture(11))).index(pipe.vision.image_token_id)
    assert other.cached_tokens <= image_start
    assert pipe.stats()["kv_blocks_used"] == 0


def test_bad_images_fail_alone_and_the_engine_keeps_serving(pipes, tmp_path):
    pipe = pipes["llava"]
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(picture(4))[:200])
    not_an_image = "data:image/png;base64," + base64.b64encode(b"plain text").decode()
    cases = {
        "missing file": (("hi", str(tmp_path / "nope.png")), "could not read the image file"),
        "truncated png": (("hi", str(truncated)), "could not be decoded"),
        "data url not an image": (("hi", not_an_image), "could not be decoded"),
        "bad base64": (("hi", "data:image/png;base64,@@@"), "invalid base64"),
        "domain not allowed": (("hi", "https://example.com/cat.png"), "not allowed"),
    }
    good = ("describe", picture(5))
    expected = pipe(good, fixed(6)).token_ids
    for name, (prompt, message) in cases.items():
        with pytest.raises(RequestError, match=message):
            pipe(prompt, fixed(4))
        results = pipe([prompt, good], fixed(6))
        assert results[0].finish_reason == "error" and message in results[0].error, name
        assert results[1].token_ids == expected, name
    one_placeholder = templated(pipe, "hi")
    with pytest.raises(RequestError, match="2 image.* but 1 image placeholder"):
        pipe((one_placeholder, [picture(6), picture(7)]), fixed(4), apply_chat_template=False)
    assert pipe.stats()["kv_blocks_used"] == 0


def test_http_images_only_from_allowed_domains(vlm_dirs, tmp_path):
    """A real HTTP server on 127.0.0.1: fetched once its domain is allowed, refused before."""
    import functools
    import http.server
    import threading

    (tmp_path / "pic.png").write_bytes(png_bytes(picture(8)))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # /away and /ftp redirect to a host or a scheme that is not allowed
            where = {"/away": url.replace("127.0.0.1", "127.0.0.2"), "/ftp": "ftp://127.0.0.1/x"}
            if self.path in where:
                self.send_response(302)
                self.send_header("Location", where[self.path])
                self.end_headers()
                return
            super().do_GET()

    handler = functools.partial(Handler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/pic.png"
    try:
        # 127.0.0.1 is a loopback address: fetched only when private addresses are allowed.
        config = {"allowed_media_domains": ["127.0.0.1"], "allow_private_media_addresses": True}
        with pipeline(str(vlm_dirs["llava"]), engine_config=config, progress=False) as pipe:
            fetched = pipe(("what is it", url), fixed(6))
            assert fetched.token_ids == pipe(("what is it", picture(8)), fixed(6)).token_ids
            with pytest.raises(RequestError, match="'127.0.0.2' is not allowed"):
                pipe(("what is it", url.replace("127.0.0.1", "127.0.0.2")), fixed(6))
            with pytest.raises(RequestError, match="'127.0.0.2' is not allowed"):
                pipe(("what is it", url.replace("pic.png", "away")), fixed(6))
            # urllib followed a redirect to ftp:// on its own; only http(s) is followed here.
            with pytest.raises(RequestError, match="could not fetch the image"):
                pipe(("what is it", url.replace("pic.png", "ftp")), fixed(6))
            assert pipe(("what is it", url), fixed(6)).token_ids == fetched.token_ids
            assert pipe.stats()["kv_blocks_used"] == 0
    finally:
        server.shutdown()


def test_generate_command_takes_images(pipes, vlm_dirs, tmp_path):
    from click.testing import CliRunner

    from enginehouse.chat_cli import printable
    from enginehouse.cli import cli

    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes(picture(9)))
    want = pipes["llava"](("what is it", picture(9)), GenerationConfig(max_new_tokens=6)).text
    args = ["generate", str(vlm_dirs["llava"]), "what", "is", "it", "--image", str(path)]
    result = CliRunner().invoke(cli, [*args, "--max-new-tokens", "6", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert result.stdout == printable(want) + "\n"
    # A missing file is found before the model loads.
    missing = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "nope.png")])
    assert missing.exit_code == 2 and "nope.png' is not a file" in missing.output


def test_image_tokens_without_images_and_perplexity_with_images_are_refused(pipes):
    pipe = pipes["llava"]
    ids = pipe.encode(("describe", picture(0)))
    with pytest.raises(RequestError, match="image tokens but no images"):
        pipe({"token_ids": ids}, fixed(2))
    with pytest.raises(RequestError, match="text prompts only"):
        pipe.get_ppl(("describe", picture(0)))
    assert pipe.get_ppl("hello world the quick brown fox") > 1


def test_text_model_refuses_images(llama_pipe):
    with pytest.raises(RequestError, match="takes text only"):
        llama_pipe(("describe", picture(0)), fixed(4))
    # A pair of strings stays a batch of two prompts for a text model.
    assert len(llama_pipe(("hello", "world"), fixed(2))) == 2


def test_openai_server_takes_image_url_parts(pipes, tmp_path):
    """The same message shape through a real server and the official client, images inline, by
    a file under the allowed folder, and refused outside it; each bad request fails alone."""
    import openai

    from enginehouse.serve import ServerThread, create_app

    pipe = pipes["llava"]
    image = picture(40)
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "pic.png").write_bytes(png_bytes(image))
    (tmp_path / "secret.png").write_bytes(png_bytes(image))
    expected = pipe(("what is this?", image), GenerationConfig(max_new_tokens=8)).text

    def ask(url: str, n: int = 1):
        return client.chat.completions.create(
            model="tiny-llava",
            n=n,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
        )

    with ServerThread(create_app(pipe, "tiny-llava", None, str(allowed))) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        inline = ask(data_url(image))
        assert inline.choices[0].message.content == expected
        assert inline.usage.prompt_tokens == len(pipe.encode(("what is this?", image)))
        assert ask((allowed / "pic.png").as_uri()).choices[0].message.content == expected
        for bad, words in [
            ((tmp_path / "secret.png").as_uri(), "--allowed-local-media-path"),
            (str(allowed / "pic.png"), "--allowed-local-media-path"),
            ("https://example.com/cat.png", "'example.com' is not allowed"),
            ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "decoded"),
        ]:
            with pytest.raises(openai.BadRequestError, match=re.escape(words)):
                ask(bad)
        two = ask(data_url(image), n=2)  # two choices share one prompt's images
        assert [c.message.content for c in two.choices] == [expected, expected]
        text_expected = pipe("hello world", GenerationConfig(max_new_tokens=8)).text
        assert asyncio.run(concurrent(running.url, data_url(image), 8)) == (
            [expected] * 8 + [text_expected] * 8
        )


async def concurrent(url: str, image_url: str, n: int) -> list[str]:
    """n image requests and n text requests at once, through the async client."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    image = [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "what is this?"},
    ]
    asks = [image] * n + ["hello world"] * n
    answers = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="tiny-llava",
                messages=[{"role": "user", "content": content}],
                max_tokens=8,
                temperature=0,
            )
            for content in asks
        )
    )
    return [a.choices[0].message.content for a in answers]


def ask_server(url: str, image_urls: list[str]):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    images = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return client.chat.completions.create(
        model="tiny-llava",
        messages=[{"role": "user", "content": [*images, {"type": "text", "text": "what?"}]}],
        max_tokens=6,
        temperature=0,
    )


def test_file_urls_are_read_once_and_only_as_regular_files_in_the_folder(
    pipes, tmp_path, monkeypatch
):
    """`file:~/../secret.png` passed the folder check (resolved without expanding `~`, from
    inside the folder) and was then opened with `~` expanded, outside it. Now one resolved path
    is checked and opened; symlinks out of the folder, devices and pipes are refused, and a
    refusal reads the same whether or not the file exists."""
    import openai

    from enginehouse.serve import ServerThread, create_app

    pipe = pipes["llava"]
    image = picture(41)
    allowed, home = tmp_path / "media", tmp_path / "home"
    allowed.mkdir()
    home.mkdir()
    (allowed / "pic.png").write_bytes(png_bytes(image))
    (tmp_path / "secret.png").write_bytes(png_bytes(image))
    (allowed / "out.png").symlink_to(tmp_path / "secret.png")
    (allowed / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(allowed / "fifo.png")
    monkeypatch.chdir(allowed)  # the server started inside its media folder
    monkeypatch.setenv("HOME", str(home))
    expected = pipe(("what?", image), GenerationConfig(max_new_tokens=6)).text
    with ServerThread(create_app(pipe, "tiny-llava", None, str(allowed))) as running:
        assert (
            ask_server(running.url, [(allowed / "pic.png").as_uri()]).choices[0].message.content
            == expected
        )
        messages = set()
        for url in [
            "file:~/../secret.png",
            "file:pic.png",
            (tmp_path / "secret.png").as_uri(),
            (tmp_path / "missing.png").as_uri(),
            (allowed / "missing.png").as_uri(),
            (allowed / "out.png").as_uri(),
            (allowed / "zero.png").as_uri(),
            (allowed / "fifo.png").as_uri(),
            "file:///dev/zero",
            "file://otherhost" + str(allowed / "pic.png"),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                ask_server(running.url, [url])
            messages.add(e.value.body["message"].replace(repr(url[:60]), "URL"))
        assert len(messages) == 1 and "--allowed-local-media-path" in messages.pop()
        answer = ask_server(running.url, [(allowed / "pic.png").as_uri()])
        assert answer.choices[0].message.content == expected
    assert pipe.stats()["kv_blocks_used"] == 0


def test_many_large_images_are_refused_before_any_is_decoded(pipes, monkeypatch, peak_memory):
    """150 images of 3000x3000 in one message (a 200 KB body) were all decoded before the
    context check: +8 GB. The pixels of a prompt's images are now counted from their headers
    (vLLM's 178,956,970, here for all of a prompt's images together) before any is decoded."""
    import openai

    from enginehouse.serve import ServerThread, create_app
    from enginehouse_vision import encoder as vision_encoder

    pipe = pipes["llava"]
    decoded = []
    decode = vision_encoder.decode_image
    monkeypatch.setattr(vision_encoder, "decode_image", lambda *a: decoded.append(1) or decode(*a))
    big = data_url(Image.new("RGB", (3000, 3000), (200, 30, 30)))
    with ServerThread(create_app(pipe, "tiny-llava")) as running:
        with peak_memory() as memory:
            with pytest.raises(openai.BadRequestError, match="more than 178,956,970 pixels"):
                ask_server(running.url, [big] * 150)
        assert not decoded and memory.growth < 200 * 2**20
        small = ask_server(running.url, [data_url(picture(42))])
        expected = pipe(("what?", picture(42)), GenerationConfig(max_new_tokens=6)).text
        assert small.choices[0].message.content == expected
    assert pipe.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_tokens_are_counted_before_decoding(family, pipes, monkeypatch):
    """The processor's own formula from the images' sizes gives the tokens it then makes; images
    whose tokens alone fill the context are refused before they are decoded."""
    from enginehouse_vision import encoder as vision_encoder

    pipe = pipes[family]
    for size in [(90, 60), (60, 90), (300, 20), (17, 500), (1000, 1000), (33, 33)]:
        counted = pipe.vision._count_tokens([(size[1], size[0])])
        assert counted == pipe.prepare(("hi", picture(1, size))).mm.num_image_tokens, size
    session = pipe.session_len
    per_image = pipe.vision._count_tokens([(400, 400)])
    too_many = [picture(i, (400, 400)) for i in range(session // per_image + 1)]
    decoded = []
    monkeypatch.setattr(vision_encoder, "decode_image", lambda *a: decoded.append(1))
    with pytest.raises(RequestError, match=f"take {len(too_many) * per_image} tokens"):
        pipe(("what?", too_many), fixed(2))
    assert not decoded
    monkeypatch.undo()
    assert pipe(("what?", picture(3)), fixed(2)).finish_reason == "length"
    assert pipe.stats()["kv_blocks_used"] == 0


def test_limits_on_images_per_prompt_and_their_pixels(vlm_dirs):
    config = {"limit_mm_per_prompt": '{"image": 2}', "max_image_pixels_per_prompt": 100 * 100}
    with pipeline(str(vlm_dirs["llava"]), engine_config=config, progress=False) as pipe:
        with pytest.raises(RequestError, match="3 images, more than the 2 allowed"):
            pipe(("what?", [picture(i, (20, 20)) for i in range(3)]), fixed(2))
        with pytest.raises(RequestError, match="more than 10,000 pixels together"):
            pipe(("what?", [picture(1, (90, 60)), picture(2, (90, 60))]), fixed(2))
        assert pipe(("what?", [picture(1, (60, 60))] * 2), fixed(2)).finish_reason == "length"
        assert pipe.stats()["kv_blocks_used"] == 0


def test_the_vision_example_runs(tmp_path):
    """examples/vision.py, as a user runs it: builds its model offline, answers, refuses."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "vision.py"
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "-> backend pytorch" in result.stdout and "images: llava" in result.stdout
    assert "a bad request is refused" in result.stdout
