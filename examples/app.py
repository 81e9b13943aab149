"""The `mister-e demo` page as a Hugging Face Space: copy this file into a Space next to a `requirements.txt`.

A Space is a git repository whose README.md starts with front matter that tells the Hub how to run it:

    ---
    title: MiSTER-E emotions in conversations
    emoji: 🎭
    colorFrom: indigo
    colorTo: pink
    sdk: gradio
    sdk_version: 6.31.0
    app_file: app.py
    pinned: false
    models:
      - your-org/your-mister-e-model
    ---

`requirements.txt`: `mister_e_hf[demo]` (the Space's `sdk_version` provides Gradio). The model is a Hub id (any
model `run_erc.py --push_to_hub` published) or a folder in the Space; set it below or as the Space variable
`MISTER_E_MODEL`. Example conversations: an `examples.jsonl` in the model folder (one conversation per line, as
`mister-e predict` reads), or `MISTER_E_EXAMPLES=path/to/conversations.jsonl`.

Locally, the same app: `python examples/app.py --model runs/meld-text-minilm` (or `mister-e demo --model ...`).
"""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page sends nothing to Gradio unless asked to

from mister_e_hf.demo import CSS, DemoBackend, build_demo, find_examples, load_model


MODEL = os.environ.get("MISTER_E_MODEL", "your-org/your-mister-e-model")
EXAMPLES = os.environ.get("MISTER_E_EXAMPLES")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The MiSTER-E demo page (a Gradio app).")
    parser.add_argument("--model", default=MODEL, help="a Hub id or a saved model folder")
    parser.add_argument("--examples", default=EXAMPLES, help="JSONL of example conversations")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    # a Space is public: a visitor's conversation file names no audio on the Space's disk (audio comes as uploads)
    examples = args.examples or find_examples(args.model)
    demo = build_demo(DemoBackend(*load_model(args.model), examples=examples, audio_dirs=[]))
    demo.launch(server_name=args.host, server_port=args.port, css=CSS)
