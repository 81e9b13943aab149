"""A web demo of a trained model in the Hugging Face Spaces style: `mister-e demo --model DIR` (Gradio).

    pip install "mister_e_hf[demo]"
    mister-e demo --model runs/emodb                  # http://127.0.0.1:7860
    mister-e demo --model runs/emodb --examples conversations.jsonl --host 0.0.0.0 --port 8080

The page takes one conversation, typed turn by turn (each turn with an optional audio file), or a JSON/JSONL
conversation file as `mister-e predict` reads it, or an example conversation (the model folder's `examples.jsonl`,
or `--examples`). It shows, per turn, the text, the predicted emotion and its score, the top-3 scores and the
experts' gate weights (a turn without audio has its speech experts at 0), and, for the whole conversation, a
timeline of the emotions above the gate weights along the turns (the data of `mister-e plot-gates`). A causal model
(`context_bidirectional=False`) also gets a *Live* tab: turns are added one at a time through the
`StreamingEmotionRecognizer`, each with its prediction and latency, earlier turns unchanged.

Bad input is shown in the page as the one-line message `mister-e predict` prints, never a traceback, and the app
keeps serving. `DemoBackend` does the work of each page action without Gradio (and is what the tests call);
`build_demo` lays out the page.
"""

import html
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import CliError, _run, error_line, load, read_conversations


MAX_TURNS = 12
"""Turn rows of the typed conversation (a longer one goes in a conversation file)."""
SHOWN_TURNS = 3
"""Turn rows shown at the start; `Add a turn` shows the next one."""
EXAMPLES_FILE = "examples.jsonl"
"""Example conversations a model folder may ship (JSONL, one conversation per line, as `mister-e predict` reads)."""
INSTALL_HINT = "the demo needs Gradio: pip install 'mister_e_hf[demo]'"

logger = logging.getLogger(__name__)


def _shown_error(error: Exception) -> str:
    """The page's one line for an error; an unexpected one (a bug, not bad input) also logs its traceback."""
    from huggingface_hub.errors import StrictDataclassError

    if not isinstance(error, (CliError, ValueError, OSError, StrictDataclassError)):
        logger.error("unexpected error in the demo", exc_info=error)
    return error_line(error)


def require_gradio():
    """The `gradio` module, or a `CliError` saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise CliError(INSTALL_HINT) from None
    return gradio


def load_model(name_or_path: str):
    """(model, processor) from a saved model folder (checked as `mister-e predict` checks it) or a Hub id."""
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return load(os.path.expanduser(name_or_path))
    import mister_e_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(name_or_path).eval(), AutoProcessor.from_pretrained(name_or_path)
    model.check_processor(processor)
    return model, processor


@dataclass
class Recognition:
    """What the page shows for one conversation: its utterances, the pipeline's prediction per utterance, and the
    one-line error instead when the input was bad."""

    utterances: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    error: str | None = None
    latencies_ms: list[float] | None = None


@dataclass
class LiveState:
    """One visitor's live conversation: the streaming state and what each pushed turn showed."""

    conversation_state: object = None
    utterances: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


class DemoBackend:
    """The page's actions on one loaded model, without Gradio."""

    def __init__(self, model, processor, examples: str | os.PathLike | None = None,
                 audio_dirs: list[str | os.PathLike] | None = None):
        """`audio_dirs`: the folders whose audio files a visitor's conversation file may name (its paths are paths
        on the machine serving the page); `None`: any file (a demo on one's own machine), `[]`: none (a public
        page; audio then comes as uploads in the turn rows). Example conversations are the model owner's, never
        restricted."""
        from transformers import pipeline

        from .pipeline import TASK

        self.model, self.processor = model, processor
        self.recognizer = pipeline(TASK, model=model, processor=processor)
        self.experts = list(model.expert_names)
        self.label_names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        self.modalities = list(model.config.modalities)
        self.streaming = not model.config.context_bidirectional
        self.examples = self._examples(examples)
        self.audio_dirs = None if audio_dirs is None else [Path(d).resolve() for d in audio_dirs]

    # ----------------------------------------------------------------------------------------- input
    def _examples(self, examples) -> list[tuple[str, list[dict]]]:
        """`(name, utterances)` of the example conversations: `examples`, else the model folder's examples.jsonl."""
        if examples is None:
            folder = getattr(self.model.config, "_name_or_path", None) or self.model.name_or_path
            candidate = Path(folder) / EXAMPLES_FILE if folder else None
            if candidate is None or not candidate.is_file():
                return []
            examples = candidate
        return [(f"example {conversation_id}", utterances)
                for _, conversation_id, utterances in read_conversations(str(examples))]

    @staticmethod
    def typed_conversation(texts: list, audios: list) -> list[dict]:
        """The utterances of the typed turns: row i's text and audio file; rows with neither are left out (an
        empty row between turns is no turn). Fails when no row has anything."""
        utterances = []
        for text, audio in zip(texts, audios):
            text = text if isinstance(text, str) and text.strip() else None
            audio = audio if isinstance(audio, str) and audio else None
            if text is not None or audio is not None:
                utterances.append({**({"text": text} if text else {}), **({"audio": audio} if audio else {})})
        if not utterances:
            raise CliError("the conversation is empty: type a turn's text or give its audio")
        return utterances

    # ----------------------------------------------------------------------------------------- actions
    def recognize(self, utterances: list[dict], position: str = "typed conversation") -> Recognition:
        """The predictions for one conversation, or the one-line error (as `mister-e predict` words it)."""
        try:
            (predictions,) = _run(self.recognizer, [(position, "0", utterances)], 1)
        except Exception as error:  # noqa: BLE001  (one line in the page; the app keeps serving)
            return Recognition(utterances, [], _shown_error(error))
        return Recognition(utterances, predictions)

    def recognize_typed(self, texts: list, audios: list) -> Recognition:
        try:
            utterances = self.typed_conversation(texts, audios)
        except CliError as error:
            return Recognition([], [], _shown_error(error))
        return self.recognize(utterances)

    def recognize_file(self, path: str | None) -> Recognition:
        """The first conversation of a JSON/JSONL file (one conversation is shown at a time)."""
        if not path:
            return Recognition([], [], error_line(CliError("no conversation file given")))
        try:
            conversations = read_conversations(path)
            if len(conversations) != 1:
                raise CliError(f"{Path(path).name}: the demo shows one conversation at a time, the file holds "
                               f"{len(conversations)}; use `mister-e predict` for many")
        except Exception as error:  # noqa: BLE001
            return Recognition([], [], _shown_error(error))
        position, conversation_id, utterances = conversations[0]
        position = Path(position).name
        for turn, utterance in enumerate(utterances):
            named = [utterance.get(key) for key in ("audio", "image")]
            if self.audio_dirs is not None and any(isinstance(p, str) and p.strip() and not any(
                    Path(p).resolve().is_relative_to(folder) for folder in self.audio_dirs) for p in named):
                allowed = ", ".join(str(folder) for folder in self.audio_dirs)
                return Recognition([], [], error_line(CliError(
                    f"{position} (conversation {conversation_id!r}, utterance {turn}): this page reads no file a "
                    f"conversation file names{f' outside {allowed}' if allowed else ''}; upload the audio in the "
                    "turn rows instead")))
        return self.recognize(utterances, position)

    def recognize_example(self, index: int) -> Recognition:
        name, utterances = self.examples[index]
        return self.recognize(utterances, name)

    def push(self, state: LiveState | None, text: str | None, audio: str | None) -> tuple[LiveState, str | None]:
        """Adds one turn to a live conversation; returns the new state and the one-line error (the state is then
        unchanged: the next turn continues from the last good one)."""
        from .streaming import StreamingEmotionRecognizer

        state = state or LiveState()
        if not self.streaming:
            return state, error_line(CliError("live mode needs a causal model (context_bidirectional=false)"))
        try:
            (utterance,) = self.typed_conversation([text], [audio])
            recognizer = StreamingEmotionRecognizer(self.model, self.processor)
            if state.conversation_state is not None:
                recognizer.state = state.conversation_state
            prediction = recognizer.push(utterance)
        except Exception as error:  # noqa: BLE001
            return state, _shown_error(error)
        shown = {**prediction.decoded, "gate_weights": prediction.gate_weights}
        new = LiveState(recognizer.state, [*state.utterances, utterance], [*state.predictions, shown],
                        [*state.latencies_ms, prediction.latency_ms])
        return new, None

    # ----------------------------------------------------------------------------------------- views
    def table_html(self, recognition: Recognition) -> str:
        """One row per turn: text, audio, emotion and score, top 3, gate weights (0 where an expert's modality is
        missing, marked so)."""
        if recognition.error:
            return ""
        latency = recognition.latencies_ms is not None
        rows = []
        for turn, (utterance, prediction) in enumerate(zip(recognition.utterances, recognition.predictions)):
            audio = utterance.get("audio")
            has_audio = audio is not None and not (isinstance(audio, str) and not audio.strip())
            text = utterance.get("text") or prediction.get("transcript")
            label = prediction.get("label")
            if label is not None:
                top = sorted(prediction["scores"].items(), key=lambda kv: -kv[1])[:3]
                emotion = f'<b class="label">{html.escape(label)}</b> {prediction["score"]:.2f}'
                top3 = " · ".join(f"{html.escape(name)} {score:.2f}" for name, score in top)
            else:  # a regression head: its values per dimension
                emotion = ""
                top3 = " · ".join(f"{html.escape(name)} {value:.2f}"
                                  for name, value in prediction.get("values", {}).items())
            gates = []
            for expert in self.experts:
                weight = float(np.mean(prediction["gate_weights"][expert]))
                missing = not has_audio and "speech" in self.modalities and expert != "text" and weight == 0.0
                gates.append(f"{html.escape(expert)} {weight:.2f}" + (" (no audio)" if missing else ""))
            cells = [str(turn), html.escape(text) if text else "<i>(no text)</i>",
                     "yes" if has_audio else "<i>no audio</i>", emotion, top3, " · ".join(gates)]
            if latency:
                cells.append(f"{recognition.latencies_ms[turn]:.0f} ms")
            rows.append(f'<tr class="prediction" data-label="{html.escape(label or "")}">'
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        header = ["turn", "text", "audio", "emotion", "top 3", "gate weights"] + (["latency"] if latency else [])
        return ('<table id="predictions-table"><thead><tr>' + "".join(f"<th>{h}</th>" for h in header)
                + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")

    def figure(self, recognition: Recognition):
        """The emotions along the turns above the stacked gate weights, or None when there is nothing to draw."""
        from .plotting import gate_weights_along_turns_figure

        if recognition.error or not recognition.predictions:
            return None
        gates = [[float(np.mean(p["gate_weights"][e])) for e in self.experts] for p in recognition.predictions]
        labelled = all("label" in p for p in recognition.predictions)
        emotions = [(p["label"], p["score"]) for p in recognition.predictions] if labelled else None
        return gate_weights_along_turns_figure(
            gates, self.experts, labels=[f"{t}: {p.get('label', '')}" for t, p in enumerate(recognition.predictions)],
            title="Emotions and experts' weights along the turns", emotions=emotions,
            label_names=self.label_names if labelled else None)

    def predictions_jsonl(self, recognition: Recognition) -> str | None:
        """The predictions as `mister-e predict` writes them, in a temporary file to download."""
        if recognition.error or not recognition.predictions:
            return None
        from .atomic import strict_json

        handle, path = tempfile.mkstemp(prefix="predictions-", suffix=".jsonl")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for turn, prediction in enumerate(recognition.predictions):
                f.write(strict_json({"conversation_id": "0", "turn": turn, **prediction}, ensure_ascii=False) + "\n")
        return path


CSS = """
#predictions-table { border-collapse: collapse; width: 100%; font-size: 0.95em; }
#predictions-table th, #predictions-table td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }
#error-box { color: #b00020; font-family: monospace; }
"""


def build_demo(backend: DemoBackend, title: str = "MiSTER-E: emotions in a conversation"):
    """The Gradio `Blocks` page of a `DemoBackend`."""
    gr = require_gradio()

    def shown(recognition: Recognition):
        error = f"`{recognition.error}`" if recognition.error else ""
        return (gr.update(value=error, visible=bool(error)), backend.table_html(recognition),
                backend.figure(recognition), backend.predictions_jsonl(recognition))

    labels = ", ".join(backend.label_names)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n\nModalities: **{', '.join(backend.modalities)}**; experts: "
                    f"**{', '.join(backend.experts)}**; labels: {labels}.")
        with gr.Tab("Conversation"):
            texts, audios, rows = [], [], []
            for turn in range(MAX_TURNS):
                with gr.Row(visible=turn < SHOWN_TURNS) as row:
                    texts.append(gr.Textbox(label=f"turn {turn} text", scale=3, elem_id=f"turn-{turn}-text"))
                    audios.append(gr.Audio(label=f"turn {turn} audio (optional)", sources=["upload"],
                                           type="filepath", format=None, scale=2, elem_id=f"turn-{turn}-audio"))
                rows.append(row)
            count = gr.State(SHOWN_TURNS)
            with gr.Row():
                add = gr.Button("Add a turn", elem_id="add-turn")
                submit = gr.Button("Recognise emotions", variant="primary", elem_id="submit")
            with gr.Accordion("or a conversation file (JSON or JSONL, as `mister-e predict` reads)", open=False):
                upload = gr.File(label="conversation file", file_types=[".json", ".jsonl"], type="filepath",
                                 elem_id="conversation-file")
                submit_file = gr.Button("Recognise the file's conversation", elem_id="submit-file")
            if backend.examples:
                with gr.Row():
                    example_buttons = [gr.Button(name, size="sm", elem_id=f"example-{i}")
                                       for i, (name, _) in enumerate(backend.examples)]
            error = gr.Markdown(visible=False, elem_id="error-box")
            table = gr.HTML(elem_id="predictions")
            chart = gr.Plot(label="emotions and gate weights along the turns", elem_id="gate-chart")
            download = gr.File(label="predictions (JSONL)", elem_id="download")

            def more(n):
                n = min(n + 1, MAX_TURNS)
                return [n, *[gr.update(visible=i < n) for i in range(MAX_TURNS)]]

            add.click(more, count, [count, *rows])
            outputs = [error, table, chart, download]
            submit.click(lambda *values: shown(backend.recognize_typed(values[:MAX_TURNS], values[MAX_TURNS:])),
                         [*texts, *audios], outputs)
            submit_file.click(lambda path: shown(backend.recognize_file(path)), upload, outputs)
            if backend.examples:
                for i, button in enumerate(example_buttons):
                    button.click(lambda i=i: shown(backend.recognize_example(i)), None, outputs)
        with gr.Tab("Live"):
            if not backend.streaming:
                gr.Markdown("Live mode adds turns one at a time and needs a causal model: train one with "
                            "`--config_overrides context_bidirectional=false`. This model is bidirectional.")
            else:
                gr.Markdown("Add turns one at a time: each new turn's prediction and latency; earlier turns "
                            "stay as they were predicted.")
                live = gr.State(None)
                with gr.Row():
                    live_text = gr.Textbox(label="next turn text", scale=3, elem_id="live-text")
                    live_audio = gr.Audio(label="next turn audio (optional)", sources=["upload"], type="filepath",
                                          format=None, scale=2, elem_id="live-audio")
                with gr.Row():
                    push = gr.Button("Add the turn", variant="primary", elem_id="live-push")
                    reset = gr.Button("New conversation", elem_id="live-reset")
                live_error = gr.Markdown(visible=False, elem_id="live-error")
                live_table = gr.HTML(elem_id="live-predictions")
                live_chart = gr.Plot(label="emotions and gate weights along the turns", elem_id="live-chart")

                def pushed(state, text, audio):
                    state, message = backend.push(state, text, audio)
                    recognition = Recognition(state.utterances, state.predictions, None, state.latencies_ms)
                    return (state, gr.update(value=f"`{message}`" if message else "", visible=bool(message)),
                            backend.table_html(recognition), backend.figure(recognition),
                            *(("", None) if message is None else (gr.update(), gr.update())))

                push.click(pushed, [live, live_text, live_audio],
                           [live, live_error, live_table, live_chart, live_text, live_audio])
                reset.click(lambda: (None, gr.update(value="", visible=False), "", None), None,
                            [live, live_error, live_table, live_chart])
    demo.queue(default_concurrency_limit=1)  # one model call at a time: the model is shared by the visitors
    return demo


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(model: str, host: str = "127.0.0.1", port: int = 7860, examples: str | None = None,
           audio_dirs: list[str] | None = None) -> None:
    """`mister-e demo`: loads the model and serves the page until interrupted. Gradio's usage analytics stay off
    unless `GRADIO_ANALYTICS_ENABLED` is set: a local demo of a model sends nothing anywhere. Served beyond this
    machine (`host` not loopback), conversation files may name audio only under `audio_dirs`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require_gradio()
    if audio_dirs is None and host not in LOOPBACK:
        audio_dirs = []
    backend = DemoBackend(*load_model(model), examples=examples, audio_dirs=audio_dirs)
    demo = build_demo(backend)
    print(f"mister-e demo: serving {model} on http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, show_error=False, quiet=True, css=CSS)


__all__ = ["DemoBackend", "Recognition", "LiveState", "build_demo", "launch", "load_model", "EXAMPLES_FILE"]
