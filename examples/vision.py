"""A vision-language model through the same `pipeline()`: images in prompts.

    python examples/vision.py [MODEL] [IMAGE]

MODEL is a local folder or a hub id of a LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL model.
Without one, a small random-weight LLaVA with a real processor is built offline in
./demo-vlm first (its answers are gibberish, but every part runs for real). IMAGE is a path or
URL; without one a generated picture is used.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from enginehouse import GenerationConfig, explain, pipeline
from enginehouse.testing import build_vlm


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        folder = Path("demo-vlm")
        if not (folder / "config.json").is_file():
            folder.mkdir()
            build_vlm(folder, "llava")
        model = str(folder)
    pixels = np.random.RandomState(0).randint(0, 256, (240, 320, 3), dtype=np.uint8)
    image = sys.argv[2] if len(sys.argv) > 2 else Image.fromarray(pixels)

    report = explain(model)
    facts = report["facts"]
    print(f"{report['model']}: {report['architecture']} -> backend {report['chosen']}")
    print(f"  images: {facts.get('vision_encoder')}, text: {facts.get('text_architecture')}")

    with pipeline(model) as pipe:
        gen = GenerationConfig(max_new_tokens=24)
        answer = pipe(("Describe this image.", image), gen)
        print(f"\n(text, image): {answer.input_token_len} prompt tokens -> {answer.text!r}")

        buf = io.BytesIO()
        (image if isinstance(image, Image.Image) else Image.open(image)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        message = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in it?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ]
        batch = pipe([message, "A text-only prompt in the same batch"], gen)
        for r in batch:
            print(f"batch [{r.index}] {r.generate_token_len} tokens: {r.text!r}")
        try:
            pipe(
                ("Two images, one placeholder <image>", [image, image]),
                gen,
                apply_chat_template=False,
            )
        except ValueError as e:  # RequestError: this request alone fails
            print(f"\na bad request is refused: {e}")


if __name__ == "__main__":
    main()
