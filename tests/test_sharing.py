"""What `push_to_hub` would upload: it loads in fresh processes with and without the package, and its card's
metadata parses back to the measured numbers (no Hub is reachable here, so the exact folder is tested)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from huggingface_hub import ModelCard

from mister_e_hf.hub import export_for_upload, files_to_upload


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[3] == "remote":
        sys.modules["mister_e_hf"] = None  # a Python with transformers but without the package
        kwargs = {"trust_remote_code": True}
    else:
        import mister_e_hf
        kwargs = {}
    import torch
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(sys.argv[1], **kwargs).eval()
    processor = AutoProcessor.from_pretrained(sys.argv[1], **kwargs)
    with torch.no_grad():
        out = model(**processor(conversations=json.load(open(sys.argv[2]))))
    print(json.dumps({"module": type(model).__module__, "logits": out.logits.tolist(),
                      "labels": [model.config.id2label[i] for i in range(model.config.num_labels)]}))
    """
)


@pytest.fixture(scope="module")
def upload(trained_run, tmp_path_factory):
    destination = tmp_path_factory.mktemp("upload")
    export_for_upload(trained_run[0], destination)
    return destination


def test_upload_holds_model_processor_code_card_results_and_no_pickles(trained_run, upload):
    names = set(files_to_upload(trained_run[0]))
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md",
            "modeling_mister_e.py", "configuration_mister_e.py", "processing_mister_e.py", "test_results.json",
            "all_results.json", "confusion_matrix_test.png", "training_args.json"} <= names
    assert not [n for n in names if n.startswith("checkpoint-") or n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert any(p.name.startswith("checkpoint-") for p in trained_run[0].iterdir())  # they exist, but stay local
    assert sorted(str(p.relative_to(upload)) for p in upload.rglob("*") if p.is_file()) == sorted(names)


def test_card_metadata_parses_back_to_the_measured_numbers(trained_run, upload):
    card = ModelCard.load(upload / "README.md")
    measured = {**json.loads((upload / "eval_results.json").read_text()),
                **json.loads((upload / "test_results.json").read_text())}
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert len(results) == 6
    for (split, metric), value in results.items():
        prefix = "eval" if split == "validation" else "test"
        assert value == pytest.approx(measured[f"{prefix}_{metric}"], abs=1e-12)
    assert card.data.library_name == "transformers" and "mister-e" in card.data.tags
    assert f"{100 * measured['test_weighted_f1']:.1f}" in card.text
    assert "trust_remote_code=True" in card.text and "No speaker identity is used" in card.text


def test_uploaded_folder_loads_in_fresh_processes_both_ways(upload, corpus, tmp_path):
    row = json.loads((corpus / "test.jsonl").read_text().splitlines()[0])
    conversations = [[{"text": row["text"], "audio": str(corpus / row["audio"])}]]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    outputs = {}
    for mode in ("package", "remote"):
        env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
        result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(upload), str(tmp_path / "conversations.json"),
                                 mode], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["package"]["module"].startswith("mister_e_hf")
    assert outputs["remote"]["module"].startswith("transformers_modules")
    assert outputs["package"]["labels"] == outputs["remote"]["labels"] == ["angry", "calm", "happy"]
    np.testing.assert_array_equal(np.array(outputs["package"]["logits"]), np.array(outputs["remote"]["logits"]))
