"""The main job: turn a model identifier into a pipeline and generate.

    python examples/quickstart.py [MODEL]

MODEL is a local folder or a hub id. Without one, a small random-weight Llama with a real
tokenizer is built offline in ./demo-model first (its output is gibberish, but every part of the
pipeline runs for real).
"""

from __future__ import annotations

import sys
from pathlib import Path

from enginehouse import GenerationConfig, explain, pipeline
from enginehouse.testing import build_model, model_configs


def main() -> None:
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        folder = Path("demo-model")
        if not (folder / "config.json").is_file():
            build_model(folder, model_configs(512)["llama"])
        model = str(folder)

    report = explain(model)
    print(f"{report['model']}: {report['architecture']} -> backend {report['chosen']}")
    for v in report["verdicts"]:
        print(f"  {'yes' if v['supported'] else 'no '} {v['backend']}: {v['reason']}")

    with pipeline(model) as pipe:
        gen = GenerationConfig(max_new_tokens=32)
        print("\none prompt:", repr(pipe("Hello", gen).text))
        for r in pipe(["Hello", "Write a haiku about trains"], gen):
            print(f"batch [{r.index}] {r.generate_token_len} tokens, {r.finish_reason}")
        print("stream: ", end="")
        for delta in pipe.stream([{"role": "user", "content": "hi"}], gen):
            print(delta.text, end="", flush=True)
        print("\nstats:", pipe.stats())


if __name__ == "__main__":
    main()
