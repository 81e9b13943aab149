"""The web demo's actions (`mister_e_hf.demo.DemoBackend`), without a browser; test_demo_browser.py drives the page."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from mister_e_hf.demo import DemoBackend, LiveState


LABELS = {0: "calm", 1: "happy", 2: "angry", 3: "sad"}


@pytest.fixture
def backend(build):
    model, processor = build("wav2vec2", "bert", id2label=LABELS)
    return DemoBackend(model, processor)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "turn.wav"
    t = np.arange(8000) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return str(path)


def test_a_typed_conversation_gets_one_prediction_per_turn_and_a_chart(backend, clip):
    shown = backend.recognize_typed(["hello there", "oh no really", "sorry about this", "", ""],
                                    [None, clip, None, None, None])
    assert shown.error is None and len(shown.predictions) == 3  # the empty rows after the last turn are no turns
    assert all(p["label"] in LABELS.values() for p in shown.predictions)
    # the turns without audio have their speech experts at 0; the one with audio uses them
    assert shown.predictions[0]["gate_weights"]["speech"] == 0.0
    assert shown.predictions[0]["gate_weights"]["cross-modal"] == 0.0
    assert shown.predictions[1]["gate_weights"]["speech"] > 0.0
    table = backend.table_html(shown)
    assert table.count('<tr class="prediction"') == 3 and table.count("(no audio)") == 4
    assert table.count("no audio</i>") == 2
    figure = backend.figure(shown)
    assert figure is not None and len(figure.axes) == 2  # emotions above, gate weights below
    lines = open(backend.predictions_jsonl(shown)).read().splitlines()
    assert [(json.loads(line)["conversation_id"], json.loads(line)["turn"]) for line in lines] == [
        ("typed", 0), ("typed", 1), ("typed", 2)]
    # an audio-only turn: the experts that need text are at 0, marked so
    only_audio = backend.table_html(backend.recognize_typed(["", "oh no"], [clip, None]))
    assert "text 0.00 (no text)" in only_audio and "speech 0.00 (no audio)" in only_audio
    # an empty row before a filled one would make turn numbers differ from the rows: refused
    assert backend.recognize_typed(["hello", "", "oh no"], [None, None, None]).error == (
        "mister-e: error: turn 1 is empty but a later turn is not: a conversation's turns follow each other; fill "
        "turn 1 or clear the turns after it")


def test_bad_input_is_one_line_and_the_next_request_works(backend, clip, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a wav file")
    shown = backend.recognize_typed(["hello", "oh no"], [None, str(not_audio)])
    assert shown.error.startswith("mister-e: error: typed conversation (conversation 'typed', utterance 1): ")
    assert "\n" not in shown.error and "Traceback" not in shown.error
    assert backend.table_html(shown) == "" and backend.figure(shown) is None
    assert backend.recognize_typed(["", " "], [None, None]).error == (
        "mister-e: error: the conversation is empty: type a turn's text or give its audio")
    assert backend.recognize_typed(["hello", "oh no"], [None, clip]).error is None


def test_a_conversation_file_as_mister_e_predict_reads_it(backend, clip, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"conversation_id": "call-7", "utterances": [{"text": "hello"}, {"audio": clip}]}))
    shown = backend.recognize_file(str(one))
    assert shown.error is None and len(shown.predictions) == 2
    assert json.loads(open(backend.predictions_jsonl(shown)).readline())["conversation_id"] == "call-7"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conversation_id": "call-8", "utterances": [{"text": "hi"}, {"audio": "/no/such.wav"}]}))
    assert backend.recognize_file(str(bad)).error.startswith(
        "mister-e: error: bad.json (conversation 'call-8', utterance 1): audio file")
    # an uploaded file keeps no folder: audio paths relative to it cannot be found, and say so
    relative = tmp_path / "relative.json"
    relative.write_text(json.dumps({"utterances": [{"text": "hi", "audio": "wav/turn.wav"}]}))
    assert backend.recognize_file(str(relative)).error == (
        "mister-e: error: relative.json (conversation '0', utterance 0): audio 'wav/turn.wav' is relative to the "
        "file's folder, which an uploaded file does not keep: give absolute paths (on the machine serving this "
        "page), or upload the audio in the turn rows")
    # a long conversation: drawn (ticks thinned, width capped); too long for the page: refused
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"text": "hello there"}] * 400))
    shown = backend.recognize_file(str(long))
    assert shown.error is None and backend.figure(shown).get_size_inches()[0] <= 24
    long.write_text(json.dumps([{"text": "hello there"}] * 501))
    assert backend.recognize_file(str(long)).error == (
        "mister-e: error: long.json: 501 turns; the demo takes up to 500 (use `mister-e predict` for longer "
        "conversations)")
    two = tmp_path / "two.jsonl"
    two.write_text('[{"text": "hi"}]\n[{"text": "bye"}]\n')
    assert "holds 2; use `mister-e predict` for many" in backend.recognize_file(str(two)).error
    broken = tmp_path / "broken.jsonl"
    broken.write_text('[{"text": "hi"}]\nnot json\n')
    assert backend.recognize_file(str(broken)).error == (  # named as the visitor named it, not by the upload's path
        "mister-e: error: broken.jsonl: not valid JSON (Expecting value, line 2)")
    assert backend.recognize_file(None).error == "mister-e: error: no conversation file given"
    # a public page reads no file of the server's that a visitor's conversation file names, but under audio_dirs
    backend.audio_dirs = []
    assert backend.recognize_file(str(one)).error == (
        "mister-e: error: one.json (conversation 'call-7', utterance 1): this page reads no file a "
        "conversation file names; upload the audio in the turn rows instead")
    backend.audio_dirs = [tmp_path.resolve()]
    assert backend.recognize_file(str(one)).error is None
    backend.audio_dirs = [(tmp_path / "elsewhere").resolve()]
    assert "outside " in backend.recognize_file(str(one)).error


def test_examples_ship_with_the_model_folder(build, tmp_path):
    model, processor = build("wav2vec2", "bert", id2label=LABELS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "examples.jsonl").write_text(
        '{"conversation_id": "greeting", "utterances": [{"text": "hello there"}, {"text": "how are you"}]}\n')
    from mister_e_hf.demo import find_examples, load_model

    folder = str(tmp_path / "model")
    backend = DemoBackend(*load_model(folder), examples=find_examples(folder))
    assert [name for name, _, _ in backend.examples] == ["example 0: greeting"]
    assert len(backend.recognize_example(0).predictions) == 2
    assert find_examples(str(tmp_path)) is None


def test_live_turns_are_added_one_at_a_time_and_earlier_ones_stay(build, clip, tmp_path):
    model, processor = build("wav2vec2", "bert", id2label=LABELS, context_bidirectional=False)
    backend = DemoBackend(model, processor)
    state, error = backend.push(None, "hello there", None)
    assert error is None and len(state.predictions) == 1 and state.latencies_ms[0] > 0
    first = state.predictions[0]
    state, error = backend.push(state, "oh no really", clip)
    assert error is None and state.predictions[0] == first and len(state.predictions) == 2
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a wav file")
    after_bad, error = backend.push(state, "sorry", str(not_audio))
    assert error.startswith("mister-e: error: streamed turn 2: ") and after_bad is state
    state, error = backend.push(state, "sorry about this", None)
    assert error is None and len(state.predictions) == 3
    # the live predictions are the offline causal model's on the same conversation
    offline = backend.recognize(state.utterances).predictions
    for live, full in zip(state.predictions, offline):
        assert live["label"] == full["label"] and live["score"] == pytest.approx(full["score"], abs=1e-5)
    table = backend.table_html(type(backend.recognize([]))(state.utterances, state.predictions, None,
                                                          state.latencies_ms))
    assert table.count(" ms</td>") == 3


def test_live_mode_needs_a_causal_model(backend):
    state, error = backend.push(LiveState(), "hello", None)
    assert error == "mister-e: error: live mode needs a causal model (context_bidirectional=false)"


def test_without_gradio_the_command_says_how_to_install_it(build, tmp_path):
    model, processor = build("wav2vec2", "bert", id2label=LABELS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    code = ("import sys; sys.modules['gradio'] = None; from mister_e_hf.cli import main; "
            f"sys.exit(main(['demo', '--model', {str(tmp_path / 'model')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == "mister-e: error: the demo needs Gradio: pip install 'mister_e_hf[demo]'"


def test_the_space_app_serves_a_model_folder(build, tmp_path):
    import socket
    import time
    import urllib.request

    from helpers import REPO_ROOT

    model, processor = build("wav2vec2", "bert", id2label=LABELS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "examples" / "app.py"), "--model",
                                str(tmp_path / "model"), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read())
                break
            except OSError:
                assert time.monotonic() < deadline, "examples/app.py did not serve within 120 s"
                time.sleep(0.5)
        labels = [c.get("props", {}).get("label") for c in config["components"]]
        assert "turn 0 text" in labels and "conversation file" in labels
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_what_the_model_cannot_use_is_shown_as_unused(build, clip):
    text_only = DemoBackend(*build(None, "bert", id2label=LABELS))
    table = text_only.table_html(text_only.recognize_typed(["hello there"], [clip]))
    assert "not used: the model has no speech backbone" in table and "(no audio)" not in table
    speech_only = DemoBackend(*build("wav2vec2", None, id2label=LABELS))
    table = speech_only.table_html(speech_only.recognize_typed(["hello there"], [clip]))
    assert "(not used: the model has no text backbone)" in table


def test_a_regression_model_shows_its_values(build, clip):
    backend = DemoBackend(*build("wav2vec2", "bert", head="regression", num_labels=3,
                                 id2label={0: "valence", 1: "arousal", 2: "dominance"}))
    shown = backend.recognize_typed(["hello there", "oh no"], [clip, None])
    assert shown.error is None
    table = backend.table_html(shown)
    assert "<th>values</th>" in table and "valence " in table and 'data-label=""' in table
    assert len(backend.figure(shown).axes) == 1  # the gate weights; no emotion timeline
