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
    shown = backend.recognize_typed(["hello there", "oh no really", "", "sorry about this"],
                                    [None, clip, None, None])
    assert shown.error is None and len(shown.predictions) == 3  # the empty row is no turn
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
    assert [json.loads(line)["turn"] for line in lines] == [0, 1, 2]


def test_bad_input_is_one_line_and_the_next_request_works(backend, clip, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a wav file")
    shown = backend.recognize_typed(["hello", "oh no"], [None, str(not_audio)])
    assert shown.error.startswith("mister-e: error: typed conversation (conversation '0', utterance 1): ")
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
    two = tmp_path / "two.jsonl"
    two.write_text('[{"text": "hi"}]\n[{"text": "bye"}]\n')
    assert "holds 2; use `mister-e predict` for many" in backend.recognize_file(str(two)).error
    broken = tmp_path / "broken.jsonl"
    broken.write_text('[{"text": "hi"}]\nnot json\n')
    assert backend.recognize_file(str(broken)).error == (
        f"mister-e: error: {broken}: not valid JSON (Expecting value, line 2)")
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
    from mister_e_hf.demo import load_model

    backend = DemoBackend(*load_model(str(tmp_path / "model")))
    assert [name for name, _ in backend.examples] == ["example greeting"]
    assert len(backend.recognize_example(0).predictions) == 2


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
