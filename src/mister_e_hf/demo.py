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
MAX_CONVERSATION_TURNS = 500
"""The most turns one request (a conversation file, or a live conversation) may hold: the page serves one model
call at a time to every visitor."""
EXAMPLES_FILE = "examples.jsonl"
"""Example conversations a model folder may ship (JSONL, one conversation per line, as `mister-e predict` reads)."""
INSTALL_HINT = "the demo needs Gradio: pip install 'mister_e_hf[demo]'"
MISSING = {"speech": "no audio", "text": "no text", "visual": "no image"}
"""How a turn without a modality is marked beside the experts the gate gave 0."""
KEPT_DOWNLOADS = 16
"""Prediction files kept for download; older ones are deleted (Gradio serves its own copy)."""

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


def _is_local(name_or_path: str) -> bool:
    return Path(os.path.expanduser(name_or_path)).exists() or name_or_path.startswith((".", "/", "~", "\\")) \
        or name_or_path.count("/") > 1 or "\\" in name_or_path


def load_model(name_or_path: str):
    """(model, processor) from a saved model folder (checked as `mister-e predict` checks it) or a Hub id."""
    if _is_local(name_or_path):
        return load(os.path.expanduser(name_or_path))
    import mister_e_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise CliError(f"{name_or_path}: no such model folder here, and no model of that id on the Hub "
                       f"({(str(error).splitlines() or [type(error).__name__])[0]})") from None
    if config.model_type != "mister-e":
        raise CliError(f"{name_or_path}: not a MiSTER-E model (its config has model_type {config.model_type!r})")
    model, processor = AutoModel.from_pretrained(name_or_path).eval(), AutoProcessor.from_pretrained(name_or_path)
    model.check_processor(processor)
    return model, processor


def find_examples(name_or_path: str) -> str | None:
    """The model's `examples.jsonl`: in its folder, or in its Hub repository; None when it has none."""
    if _is_local(name_or_path):
        candidate = Path(os.path.expanduser(name_or_path)) / EXAMPLES_FILE
        return str(candidate) if candidate.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name_or_path, EXAMPLES_FILE)
    except Exception:  # noqa: BLE001  (not in the repository, offline, ...: no examples)
        return None


@dataclass
class Recognition:
    """What the page shows for one conversation: its utterances, the pipeline's prediction per utterance, and the
    one-line error instead when the input was bad."""

    utterances: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    error: str | None = None
    latencies_ms: list[float] | None = None
    conversation_id: str = "typed"


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
                 audio_dirs: list[str | os.PathLike] | None = None, asr_model: str | None = None):
        """`examples`: a JSONL of example conversations (`find_examples` gives the model's own). `audio_dirs`: the
        folders whose files a visitor's conversation file may name (its paths are paths on the machine serving the
        page); `None`: any file (a demo on one's own machine), `[]`: none (a public page; audio then comes as
        uploads in the turn rows). Example conversations are the model owner's, never restricted. `asr_model`:
        transcribes turns that have audio but no text (as `mister-e predict --asr_model`)."""
        from transformers import pipeline

        from .pipeline import TASK

        self.model, self.processor = model, processor
        self.recognizer = pipeline(TASK, model=model, processor=processor)
        self.experts = list(model.expert_names)
        self.label_names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        self.modalities = list(model.config.modalities)
        self.streaming = not model.config.context_bidirectional
        self.asr_model = asr_model
        self.examples = [] if examples is None else [
            (f"example {i}: {conversation_id}", conversation_id, utterances)
            for i, (_, conversation_id, utterances) in enumerate(read_conversations(str(examples)))]
        self.audio_dirs = None if audio_dirs is None else [Path(d).resolve() for d in audio_dirs]
        self._downloads_dir = tempfile.TemporaryDirectory(prefix="mister-e-demo-")
        self._downloads: list[Path] = []

    # ----------------------------------------------------------------------------------------- input
    @staticmethod
    def typed_conversation(texts: list, audios: list) -> list[dict]:
        """The utterances of the typed turns: row i's text and audio file. Empty rows after the last filled one
        are no turns; an empty row before a filled one is an error (turn numbers would not match the rows)."""
        rows = []
        for text, audio in zip(texts, audios):
            text = text if isinstance(text, str) and text.strip() else None
            audio = audio if isinstance(audio, str) and audio else None
            rows.append({**({"text": text} if text else {}), **({"audio": audio} if audio else {})})
        while rows and not rows[-1]:
            rows.pop()
        if not rows:
            raise CliError("the conversation is empty: type a turn's text or give its audio")
        if any(not row for row in rows):
            gap = next(i for i, row in enumerate(rows) if not row)
            raise CliError(f"turn {gap} is empty but a later turn is not: a conversation's turns follow each other; "
                           f"fill turn {gap} or clear the turns after it")
        return rows

    def _check_file_paths(self, position: str, conversation_id: str, utterances: list[dict]) -> None:
        """Refuses the paths an uploaded file names that cannot be read: relative ones (an upload keeps no folder)
        and, on a public page, files outside `audio_dirs`."""
        for turn, utterance in enumerate(utterances):
            for key in ("audio", "image"):
                value = utterance.get(key)
                if not isinstance(value, str) or not value.strip():
                    continue
                where = f"{position} (conversation {conversation_id!r}, utterance {turn})"
                if not os.path.isabs(os.path.expanduser(value)):
                    raise CliError(f"{where}: {key} {value!r} is relative to the file's folder, which an uploaded "
                                   "file does not keep: give absolute paths (on the machine serving this page), or "
                                   "upload the audio in the turn rows")
                try:
                    resolved = Path(os.path.expanduser(value)).resolve()
                except (OSError, ValueError):
                    raise CliError(f"{where}: {key} path {value!r} is not a file path") from None
                if self.audio_dirs is not None and not any(resolved.is_relative_to(d) for d in self.audio_dirs):
                    allowed = ", ".join(str(d) for d in self.audio_dirs)
                    raise CliError(f"{where}: this page reads no file a conversation file names"
                                   f"{f' outside {allowed}' if allowed else ''}; upload the audio in the turn rows "
                                   "instead")

    # ----------------------------------------------------------------------------------------- actions
    def recognize(self, utterances: list[dict], position: str = "typed conversation",
                  conversation_id: str = "typed") -> Recognition:
        """The predictions for one conversation, or the one-line error (as `mister-e predict` words it)."""
        try:
            if len(utterances) > MAX_CONVERSATION_TURNS:
                raise CliError(f"{position}: {len(utterances)} turns; the demo takes up to {MAX_CONVERSATION_TURNS} "
                               "(use `mister-e predict` for longer conversations)")
            (predictions,) = _run(self.recognizer, [(position, conversation_id, utterances)], 1, self.asr_model)
        except Exception as error:  # noqa: BLE001  (one line in the page; the app keeps serving)
            return Recognition(utterances, [], _shown_error(error), conversation_id=conversation_id)
        return Recognition(utterances, predictions, conversation_id=conversation_id)

    def recognize_typed(self, texts: list, audios: list) -> Recognition:
        try:
            utterances = self.typed_conversation(texts, audios)
        except CliError as error:
            return Recognition([], [], error_line(error))
        return self.recognize(utterances)

    def recognize_file(self, path: str | None) -> Recognition:
        """The conversation of an uploaded JSON/JSONL file (one per page), named by the file's name."""
        if not path:
            return Recognition([], [], error_line(CliError("no conversation file given")))
        name = Path(path).name
        try:
            conversations = read_conversations(path, resolve_paths=False)  # an upload keeps no folder
            if len(conversations) != 1:
                raise CliError(f"{name}: the demo shows one conversation at a time, the file holds "
                               f"{len(conversations)}; use `mister-e predict` for many")
            position, conversation_id, utterances = conversations[0]
            position = position.replace(str(path), name)
            self._check_file_paths(position, conversation_id, utterances)
        except Exception as error:  # noqa: BLE001
            return Recognition([], [], _shown_error(error).replace(str(path), name))
        return self.recognize([{**u, **{k: os.path.expanduser(u[k]) for k in ("audio", "image")
                                        if isinstance(u.get(k), str)}} for u in utterances], position, conversation_id)

    def recognize_example(self, index: int) -> Recognition:
        name, conversation_id, utterances = self.examples[index]
        return self.recognize(utterances, name, conversation_id)

    def push(self, state: LiveState | None, text: str | None, audio: str | None) -> tuple[LiveState, str | None]:
        """Adds one turn to a live conversation; returns the new state and the one-line error (the state is then
        unchanged: the next turn continues from the last good one)."""
        from .streaming import StreamingEmotionRecognizer

        state = state or LiveState()
        if not self.streaming:
            return state, error_line(CliError("live mode needs a causal model (context_bidirectional=false)"))
        try:
            if len(state.utterances) >= MAX_CONVERSATION_TURNS:
                raise CliError(f"the live conversation has {len(state.utterances)} turns, the most the demo takes: "
                               "start a new conversation")
            text = text if isinstance(text, str) and text.strip() else None
            audio = audio if isinstance(audio, str) and audio else None
            if text is None and audio is None:
                raise CliError(f"turn {len(state.utterances)} is empty: type its text or give its audio")
            utterance = {**({"text": text} if text else {}), **({"audio": audio} if audio else {})}
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
    def _present(self, utterance: dict) -> tuple[set, set]:
        """(the model's modalities this utterance has, the modalities it gives that the model has no backbone for)."""
        from .processing_mister_e import MODALITY_KEYS, is_blank

        given = {m for m, key in MODALITY_KEYS.items() if not is_blank(utterance.get(key))}
        return given & set(self.modalities), given - set(self.modalities)

    def table_html(self, recognition: Recognition) -> str:
        """One row per turn: text, audio, emotion and score (or a regression head's values), top 3, gate weights
        (an expert at 0 on a turn that lacks a modality is marked with what it lacks)."""
        if recognition.error:
            return ""
        latency = recognition.latencies_ms is not None
        rows = []
        for turn, (utterance, prediction) in enumerate(zip(recognition.utterances, recognition.predictions)):
            present, unused = self._present(utterance)
            text = utterance.get("text") if "text" in present or "text" in unused else prediction.get("transcript")
            text_cell = html.escape(text) if text else "<i>(no text)</i>"
            if "transcript" in prediction:
                text_cell += " <i>(transcribed)</i>"
            if "text" in unused:
                text_cell += " <i>(not used: the model has no text backbone)</i>"
            if "speech" in self.modalities:
                audio_cell = "yes" if "speech" in present else "<i>no audio</i>"
            else:
                audio_cell = "<i>not used: the model has no speech backbone</i>" if "speech" in unused else "—"
            label = prediction.get("label")
            if label is not None:
                top = sorted(prediction["scores"].items(), key=lambda kv: -kv[1])[:3]
                emotion = f'<b class="label">{html.escape(label)}</b> {prediction["score"]:.2f}'
                top3 = " · ".join(f"{html.escape(name)} {score:.2f}" for name, score in top)
            else:  # a regression head: its values per dimension
                emotion = " · ".join(f"{html.escape(name)} {value:.2f}"
                                     for name, value in prediction.get("values", {}).items())
                top3 = "—"
            missing = [MISSING[m] for m in self.modalities if m not in present]
            gates = []
            for expert in self.experts:
                weight = float(np.mean(prediction["gate_weights"][expert]))
                mark = f" ({', '.join(missing)})" if missing and weight == 0.0 else ""
                gates.append(f"{html.escape(expert)} {weight:.2f}{mark}")
            cells = [str(turn), text_cell, audio_cell, emotion, top3, " · ".join(gates)]
            if latency:
                cells.append(f"{recognition.latencies_ms[turn]:.0f} ms")
            rows.append(f'<tr class="prediction" data-label="{html.escape(label or "")}">'
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        labelled = any("label" in p for p in recognition.predictions)
        header = ["turn", "text", "audio", "emotion" if labelled else "values",
                  "top 3", "gate weights"] + (["latency"] if latency else [])
        return ('<table id="predictions-table"><thead><tr>' + "".join(f"<th>{h}</th>" for h in header)
                + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")

    def figure(self, recognition: Recognition):
        """The emotions along the turns above the stacked gate weights (a regression head: the gate weights only),
        or None when there is nothing to draw."""
        from .plotting import gate_weights_along_turns_figure

        if recognition.error or not recognition.predictions:
            return None
        gates = [[float(np.mean(p["gate_weights"][e])) for e in self.experts] for p in recognition.predictions]
        if all("label" in p for p in recognition.predictions):
            return gate_weights_along_turns_figure(
                gates, self.experts, labels=[f"{t}: {p['label']}" for t, p in enumerate(recognition.predictions)],
                title="Emotions and experts' weights along the turns",
                emotions=[(p["label"], p["score"]) for p in recognition.predictions], label_names=self.label_names)
        return gate_weights_along_turns_figure(gates, self.experts)

    def predictions_jsonl(self, recognition: Recognition) -> str | None:
        """The predictions as `mister-e predict` writes them, in a file to download (the last `KEPT_DOWNLOADS`
        are kept)."""
        if recognition.error or not recognition.predictions:
            return None
        from .atomic import strict_json

        handle, path = tempfile.mkstemp(prefix="predictions-", suffix=".jsonl", dir=self._downloads_dir.name)
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for turn, prediction in enumerate(recognition.predictions):
                f.write(strict_json({"conversation_id": recognition.conversation_id, "turn": turn, **prediction},
                                    ensure_ascii=False) + "\n")
        self._downloads.append(Path(path))
        while len(self._downloads) > KEPT_DOWNLOADS:
            self._downloads.pop(0).unlink(missing_ok=True)
        return path


CSS = """
#predictions-table, #live-predictions-table { border-collapse: collapse; width: 100%; font-size: 0.95em; }
#predictions-table th, #predictions-table td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }
.error-line { color: #b00020; font-family: monospace; white-space: pre-wrap; }
"""


def _error_html(message: str | None) -> str:
    return f'<div class="error-line">{html.escape(message)}</div>' if message else ""


def build_demo(backend: DemoBackend, title: str = "MiSTER-E: emotions in a conversation"):
    """The Gradio `Blocks` page of a `DemoBackend`. Every action that runs the model shares one queue slot (the
    model is shared by the visitors); uploads and results are deleted from Gradio's cache after an hour."""
    gr = require_gradio()
    model_call = dict(concurrency_id="model", concurrency_limit=1)

    def shown(recognition: Recognition):
        return (_error_html(recognition.error), backend.table_html(recognition), backend.figure(recognition),
                backend.predictions_jsonl(recognition))

    labels = ", ".join(backend.label_names)
    analytics = os.environ.get("GRADIO_ANALYTICS_ENABLED", "False").lower() in ("1", "true", "yes")
    with gr.Blocks(title=title, delete_cache=(3600, 3600), analytics_enabled=analytics) as demo:
        gr.Markdown(f"# {title}\n\nModalities: **{', '.join(backend.modalities)}**; experts: "
                    f"**{', '.join(backend.experts)}**; {'labels' if backend.model.head.target == 'classes' else 'dimensions'}: {labels}.")
        with gr.Tab("Conversation"):
            texts, audios, rows = [], [], []
            for turn in range(MAX_TURNS):
                with gr.Row(visible=turn < SHOWN_TURNS) as row:
                    texts.append(gr.Textbox(label=f"turn {turn} text", scale=3, elem_id=f"turn-{turn}-text"))
                    audios.append(gr.Audio(label=f"turn {turn} audio (optional)", sources=["upload"],
                                           type="filepath", format=None, scale=2, elem_id=f"turn-{turn}-audio",
                                           visible="speech" in backend.modalities))
                rows.append(row)
            count = gr.State(SHOWN_TURNS)
            with gr.Row():
                add = gr.Button("Add a turn", elem_id="add-turn")
                submit = gr.Button("Recognise emotions", variant="primary", elem_id="submit")
            with gr.Accordion("or a conversation file (JSON or JSONL, as `mister-e predict` reads)", open=False):
                upload = gr.File(label="conversation file", file_types=[".json", ".jsonl"], type="filepath",
                                 elem_id="conversation-file")
                submit_file = gr.Button("Recognise the file's conversation", elem_id="submit-file")
            example_buttons = []
            if backend.examples:
                with gr.Row():
                    example_buttons = [gr.Button(name, size="sm", elem_id=f"example-{i}")
                                       for i, (name, _, _) in enumerate(backend.examples)]
            error = gr.HTML(elem_id="error-box")
            table = gr.HTML(elem_id="predictions")
            chart = gr.Plot(label="emotions and gate weights along the turns", elem_id="gate-chart")
            download = gr.File(label="predictions (JSONL)", elem_id="download")

            def more(n):
                n = min(n + 1, MAX_TURNS)
                return [n, gr.update(interactive=n < MAX_TURNS), *[gr.update(visible=i < n) for i in range(MAX_TURNS)]]

            add.click(more, count, [count, add, *rows])
            outputs = [error, table, chart, download]
            submit.click(lambda *values: shown(backend.recognize_typed(values[:MAX_TURNS], values[MAX_TURNS:])),
                         [*texts, *audios], outputs, **model_call)
            submit_file.click(lambda path: shown(backend.recognize_file(path)), upload, outputs, **model_call)
            for i, button in enumerate(example_buttons):
                button.click(lambda i=i: shown(backend.recognize_example(i)), None, outputs, **model_call)
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
                                          format=None, scale=2, elem_id="live-audio",
                                          visible="speech" in backend.modalities)
                with gr.Row():
                    push = gr.Button("Add the turn", variant="primary", elem_id="live-push")
                    reset = gr.Button("New conversation", elem_id="live-reset")
                live_error = gr.HTML(elem_id="live-error")
                live_table = gr.HTML(elem_id="live-predictions")
                live_chart = gr.Plot(label="emotions and gate weights along the turns", elem_id="live-chart")

                def pushed(state, text, audio):
                    state, message = backend.push(state, text, audio)
                    recognition = Recognition(state.utterances, state.predictions, None, state.latencies_ms)
                    cleared = ("", None) if message is None else (gr.update(), gr.update())
                    return (state, _error_html(message), backend.table_html(recognition).replace(
                        'id="predictions-table"', 'id="live-predictions-table"'), backend.figure(recognition),
                        *cleared)

                push.click(pushed, [live, live_text, live_audio],
                           [live, live_error, live_table, live_chart, live_text, live_audio], **model_call)
                reset.click(lambda: (None, "", "", None), None, [live, live_error, live_table, live_chart])
    demo.queue(default_concurrency_limit=1)
    return demo


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(model: str, host: str = "127.0.0.1", port: int = 7860, examples: str | None = None,
           audio_dirs: list[str] | None = None, asr_model: str | None = None) -> None:
    """`mister-e demo`: loads the model and serves the page until interrupted. Gradio's usage analytics stay off
    unless `GRADIO_ANALYTICS_ENABLED` is set: a local demo of a model sends nothing anywhere. Served beyond this
    machine (`host` not loopback), conversation files may name audio only under `audio_dirs`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require_gradio()
    if audio_dirs is None and host not in LOOPBACK:
        audio_dirs = []
    backend = DemoBackend(*load_model(model), examples=examples or find_examples(model), audio_dirs=audio_dirs,
                          asr_model=asr_model)
    demo = build_demo(backend)
    print(f"mister-e demo: serving {model} on http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, show_error=False, quiet=True, css=CSS)


__all__ = ["DemoBackend", "Recognition", "LiveState", "build_demo", "launch", "load_model", "find_examples",
           "EXAMPLES_FILE"]
