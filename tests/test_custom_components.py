"""Components written outside the package plug in through the registries: `examples/custom_fusion.py` defines a
fusion with its own loss and a head with its own loss and decoding, trains, saves, reloads and predicts with them."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT

from mister_e_hf import MisterEConfig, MisterEError, MisterEModel, list_components, register_fusion
from mister_e_hf.registry import FUSIONS, Registry, UnknownComponentError


@pytest.fixture(scope="module")
def plugin():
    """`examples/custom_fusion.py` imported once (its components register themselves on import)."""
    if "custom_fusion" not in sys.modules:
        spec = importlib.util.spec_from_file_location("custom_fusion", REPO_ROOT / "examples" / "custom_fusion.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["custom_fusion"] = module
        spec.loader.exec_module(module)
    return sys.modules["custom_fusion"]


def test_the_example_plug_ins_train_save_reload_and_predict(plugin, tiny_backbones, corpus, tmp_path):
    speech, text = tiny_backbones
    result = plugin.main(["--data_dir", str(corpus), "--speech_model_name_or_path", str(speech),
                          "--text_model_name_or_path", str(text), "--output_dir", str(tmp_path / "run"),
                          "--embedding_cache_dir", str(tmp_path / "cache"), "--epochs", "2", "--projection_dim", "16"])
    assert "late-average" in result["components"]["fusion"] and "margin-classification" in result["components"]["head"]
    assert {"agreement_loss", "margin_loss", "mixture_loss", "kl_loss"} <= set(result["logged"])  # the trainer logs them
    assert result["fusion"] == "LateAverageFusion" and result["head"] == "MarginClassificationHead"
    first = result["predictions"][0]
    assert {"label", "score", "scores", "gate_weights", "margin"} <= set(first)  # the head decodes its own field
    assert set(first["gate_weights"]) == {"speech", "text", "joint"}
    assert 0 <= first["margin"] <= 1 and "test_weighted_f1" in result["metrics"]

    # in a process that does not import the plug-in, the checkpoint cannot be built: a named error, not a crash
    script = ("import mister_e_hf, sys\nfrom transformers import AutoModel\n"
              "try:\n    AutoModel.from_pretrained(sys.argv[1])\nexcept Exception as error:\n"
              "    print('REFUSED', ' '.join(str(error).split()))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300)
    assert "REFUSED" in done.stdout, done.stdout + done.stderr
    assert "Unknown fusion 'late-average'" in done.stdout and "import it before building or loading" in done.stdout


def test_registries_refuse_duplicates_and_list_what_they_hold():
    registry = Registry("widget", "Widgets for tests.")

    @registry.register("round")
    class Round:
        pass

    assert registry["round"] is Round and list(registry) == ["round"] and "round" in registry
    with pytest.raises(MisterEError, match="A widget named 'round' is already registered .*override=True"):
        registry.register("round", type("Other", (), {}))
    replacement = registry.register("round", type("Other", (), {}), override=True)
    assert registry["round"] is replacement
    with pytest.raises(UnknownComponentError, match=r"Unknown widget 'square'; registered: \['round'\]"):
        registry["square"]  # noqa: B018
    with pytest.raises(KeyError):  # still a KeyError for code that expects one
        registry["square"]  # noqa: B018
    kinds = list_components()
    assert set(kinds) == {"fusion", "head", "gate", "context_layer", "pooling", "layer_combiner", "loader"}
    assert {"film-moe", "guided-gated", "mister-e"} <= set(kinds["fusion"]) and kinds["fusion"] == sorted(kinds["fusion"])
    with pytest.raises(MisterEError, match="already registered"):
        register_fusion("mister-e", type("Impostor", (), {}))
    with pytest.raises(Exception, match=r"Unknown fusion 'nope' \(`fusion`\); registered: \[.*'mister-e'"):
        MisterEConfig(speech_embed_dim=4, fusion="nope")


def _model(**overrides):
    torch.manual_seed(0)
    config = MisterEConfig(speech_embed_dim=8, text_embed_dim=8, num_labels=3, projection_dim=8,
                           cross_attention_heads=2, **overrides)
    return MisterEModel(config).eval()


def test_loss_weights_override_any_declared_term_by_name(plugin):
    speech, text = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    with torch.no_grad():
        default = _model(fusion="late-average")(speech_embeds=speech, text_embeds=text, labels=labels)
        silenced = _model(fusion="late-average", loss_weights={"agreement_loss": 0.0, "kl_loss": 0.0})(
            speech_embeds=speech, text_embeds=text, labels=labels)
    terms = default.losses
    weights = _model(fusion="late-average").loss_weights
    assert weights["agreement_loss"] == 0.2 and weights["kl_loss"] == 0.1
    assert default.loss.item() == pytest.approx(sum(weights[n] * v.item() for n, v in terms.items()), rel=1e-6)
    assert silenced.loss.item() == pytest.approx(
        default.loss.item() - 0.2 * terms["agreement_loss"].item() - 0.1 * terms["kl_loss"].item(), rel=1e-5)
    with pytest.raises(Exception, match=r"`loss_weights` names \['agreement_los'\], which neither .* returns"):
        _model(fusion="late-average", loss_weights={"agreement_los": 1.0})
    with pytest.raises(Exception, match="finite numbers >= 0"):
        _model(loss_weights={"kl_loss": -1.0})
    saved = _model(loss_weights={"kl_loss": 0.5}).config.to_dict()
    assert saved["loss_weights"] == {"kl_loss": 0.5}  # saved in config.json


def test_a_component_returning_an_undeclared_loss_term_is_refused(plugin):
    class Leaky(plugin.LateAverageFusion):
        def forward(self, features, utterance_mask, state=None):
            output = super().forward(features, utterance_mask, state)
            output.aux_losses["surprise_loss"] = output.expert_outputs.sum() * 0
            return output

    register_fusion("leaky-test", Leaky)
    try:
        with pytest.raises(MisterEError, match=r"returned the loss terms \['surprise_loss'\], which neither declares"):
            _model(fusion="leaky-test")(speech_embeds=torch.randn(1, 2, 8), text_embeds=torch.randn(1, 2, 8),
                                        labels=torch.tensor([[0, 1]]))
    finally:
        FUSIONS.unregister("leaky-test")
    assert "leaky-test" not in FUSIONS


def test_every_component_checks_its_own_settings():
    for settings, message in ((dict(cross_attention_heads=3), "must divide `projection_dim`"),
                              (dict(context_kernel_sizes=[1, 0]), "context_kernel_sizes"),
                              (dict(fusion="film-moe", num_film_experts=0), "num_film_experts"),
                              (dict(head="regression", num_labels=2, ccc_weights=[1.0]), "ccc_weights"),
                              (dict(num_labels=1), "at least 2 labels")):
        with pytest.raises(Exception, match=message):
            MisterEConfig(speech_embed_dim=8, text_embed_dim=8, projection_dim=8, **settings)
    json.dumps(list_components())
