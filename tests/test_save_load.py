"""Save -> load through the Auto classes, and through `trust_remote_code=True` where the package cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import make_conversations, random_labels
from transformers import AutoConfig, AutoModel, AutoProcessor

from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor


PAIRS = [("wav2vec2", "bert"), ("whisper", "llama"), (None, "roberta"), ("hubert", None)]


@pytest.mark.parametrize("speech,text", PAIRS)
def test_auto_classes_round_trip(build, tmp_path, speech, text):
    model, processor = build(speech, text)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mister_e.MisterEConfig",
        "AutoModel": "modeling_mister_e.MisterEModel",
        "AutoProcessor": "processing_mister_e.MisterEProcessor",
    }
    assert {"configuration_mister_e.py", "modeling_mister_e.py", "processing_mister_e.py"} <= set(files)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), MisterEConfig)
    loaded, loaded_processor = AutoModel.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MisterEModel and type(loaded_processor) is MisterEProcessor
    conversations = make_conversations([3, 2], seed=21, with_audio=speech is not None)
    inputs = processor(conversations=conversations)
    with torch.no_grad():
        expected = model(**inputs, labels=random_labels(inputs))
        actual = loaded.eval()(**loaded_processor(conversations=conversations), labels=random_labels(inputs))
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.loss, expected.loss)


def assert_same_buffers(model, loaded):
    """Every buffer, saved or not (non-persistent ones are refilled by `_init_weights`, never left uninitialised)."""
    buffers, loaded_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert buffers.keys() == loaded_buffers.keys()
    for name, buffer in buffers.items():
        assert torch.equal(buffer, loaded_buffers[name]), name


@pytest.mark.parametrize("fusion", ["mister-e", "guided-gated", "film-moe"])
def test_a_regression_model_has_the_same_buffers_and_loss_after_loading(tmp_path, fusion):
    config = MisterEConfig(speech_embed_dim=8, text_embed_dim=8, head="regression", id2label={0: "v", 1: "a"},
                           ccc_weights=[1.0, 3.0], fusion=fusion, standardize_embeddings=True, projection_dim=16,
                           cross_attention_heads=2)
    model = MisterEModel(config).eval()
    for modality in ("speech", "text"):
        model.fit_embedding_statistics(modality, torch.randn(20, 8) * 3 + 1)
    model.save_pretrained(tmp_path)
    loaded = MisterEModel.from_pretrained(tmp_path).eval()
    assert loaded.head.ccc_weights.tolist() == [1.0, 3.0]
    assert_same_buffers(model, loaded)
    speech, text, labels = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 2)
    with torch.no_grad():
        assert torch.equal(model(speech_embeds=speech, text_embeds=text, labels=labels).loss,
                           loaded(speech_embeds=speech, text_embeds=text, labels=labels).loss)


def test_weights_missing_from_or_foreign_to_the_file_are_refused(build, tmp_path):
    from safetensors.torch import load_file, save_file

    from mister_e_hf import MisterEError

    model, _ = build("wav2vec2", "bert")
    model.save_pretrained(tmp_path)
    assert_same_buffers(model, MisterEModel.from_pretrained(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    dropped = weights.pop("fusion.gate.net.0.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MisterEError, match=r"1 weights missing .*fusion.gate.net.0.weight"):
        MisterEModel.from_pretrained(tmp_path)
    save_file({**weights, "fusion.gate.net.0.weight": dropped, "stray.weight": dropped.clone()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MisterEError, match=r"1 weights not part of this model: \['stray.weight'\]"):
        AutoModel.from_pretrained(tmp_path)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["mister_e_hf"] = None  # this Python has transformers but cannot import the package
    try:
        import mister_e_hf
    except ImportError:
        pass
    else:
        raise SystemExit("the package was importable")
    import torch
    from transformers import AutoModel, AutoProcessor
    folder, conversations = sys.argv[1], json.load(open(sys.argv[2]))
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(**processor(conversations=conversations)).logits
    print(json.dumps({"logits": logits.tolist(), "class": type(model).__name__, "processor": type(processor).__name__}))
    """
)


@pytest.mark.parametrize("speech,text", [("wav2vec2", "bert"), ("whisper", "llama")])
def test_trust_remote_code_in_a_fresh_process_without_the_package(build, tmp_path, speech, text):
    model, processor = build(speech, text)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    conversations = make_conversations([2, 1], seed=22)
    for conversation in conversations:
        for utterance in conversation:
            utterance["audio"] = utterance["audio"].tolist()
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "conversations.json")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"] == "MisterEModel" and remote["processor"] == "MisterEProcessor"
    with torch.no_grad():
        expected = model(**processor(conversations=conversations)).logits
    np.testing.assert_array_equal(np.array(remote["logits"], dtype=np.float32), expected.numpy())


def test_a_checkpoint_saved_before_the_component_registries_still_loads_and_predicts_the_same(tmp_path):
    """`tests/data/checkpoint-0.1.0` holds the config.json that mister_e_hf 0.1.0 wrote before loss terms, heads and
    components became registered plug-ins (no `loss_weights`, one field per loss term) and, in expected.json, its
    parameter names and shapes, inputs, and the logits, gate weights and losses that code computed on the weights
    `helpers.seeded_state_dict` draws for those names (no weight file is stored)."""
    import shutil

    from helpers import REPO_ROOT, seeded_state_dict
    from safetensors.torch import save_file

    source = REPO_ROOT / "tests" / "data" / "checkpoint-0.1.0"
    expected = json.loads((source / "expected.json").read_text())
    folder = tmp_path / "checkpoint-0.1.0"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    save_file(seeded_state_dict(expected["parameters"]), str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModel.from_pretrained(folder).eval()
    assert model.config.loss_weights is None and model.embedding_statistics_fitted
    inputs = {name: torch.tensor(expected[name]) for name in ("speech_embeds", "text_embeds", "utterance_mask", "labels")}
    with torch.no_grad():
        outputs = model(**inputs)
    torch.testing.assert_close(outputs.logits, torch.tensor(expected["logits"]))
    torch.testing.assert_close(outputs.gate_weights, torch.tensor(expected["gate_weights"]))
    assert outputs.loss.item() == pytest.approx(expected["loss"], rel=1e-6)
    for term in ("mixture_loss", "kl_loss", "supcon_loss", "expert_loss"):
        assert outputs.losses[term].item() == pytest.approx(expected[term], rel=1e-6), term
