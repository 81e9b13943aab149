#!/usr/bin/env python
"""Robustness probes: the toolkit's public surface tried as a demanding user would, every outcome classified.

Each probe feeds one odd input (empty or whitespace text, NaN or int16 audio, a CSV with an unquoted comma, a
flipped byte in a cache shard, `batch_size=-1`, ...) to a public entry point (processor, collator, model forward,
pipeline, streaming, corpus loaders, embedding cache, the `mister-e` CLI, training, config) and is classified into
exactly one outcome:

- `named error`: the toolkit refused with its own clear error: raised by a `raise` statement inside the package (or
  of a type defined there; or an operating-system error naming the path), whose message is a sentence. For the
  CLI: a non-zero exit with one line `mister-e: error: ...` (and the error behind it raised by the toolkit); for
  `examples/run_erc.py`: a final error line whose traceback ends in a toolkit `raise`.
- `finite result`: returned, and the probe's own validator says the result is right (finite numbers, gate weights
  summing to 1 over the available experts, the right label set, int16 audio scaled as soundfile scales it, ...).
- `obscure crash`: any other exception (from inside torch, numpy, datasets, tokenizers, transformers, pyarrow, or a
  bare KeyError / IndexError / TypeError / ... from an operation in the toolkit), or a CLI traceback.
- `silent garbage`: returned without error, but the validator says the result is wrong or meaningless (NaN, an
  invented class, dropped utterances, unscaled int16, a mistyped option ignored, a non-finite model saved, ...).

Each probe declares what a correct toolkit does (`named error`, `finite result`, or either, each result validated),
so that the same probes classify old and new code alike; a probe passes when its outcome is one it expects. A
failure of the harness itself (its own set-up or validator) is reported as a harness error, never as an outcome.
Everything runs on tiny random backbones built in a temporary folder (no shared assets); the CLI and
`examples/run_erc.py` run a few times as subprocesses.

    python benchmarks/robustness.py --tag now                 # writes benchmarks/results/robustness-now.{json,md}
    python benchmarks/robustness.py --only loaders,cache      # some areas
    python benchmarks/robustness.py --tag before --source-root ../checkout-of-an-older-commit
"""

import argparse
import contextlib
import datetime
import dis
import importlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import REPO_ROOT, hardware_info, markdown_table


class LazyModule:
    """A module imported on first use, so that `--list` and `--help` import no torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self._name), attribute)


torch = LazyModule("torch")
np = LazyModule("numpy")

NAMED, FINITE, OBSCURE, GARBAGE = "named error", "finite result", "obscure crash", "silent garbage"
OUTCOMES = (NAMED, FINITE, OBSCURE, GARBAGE)
EITHER = "named error or finite result"
"""A probe's expectation when refusing and a validated result are both correct (e.g. labels given as bool: cast
them or refuse them clearly)."""
HARNESS = "harness error"
"""The harness's own set-up or validator failed: a bug to fix here, never counted as a toolkit outcome."""

AREAS = ("processor-text", "processor-audio", "processor-image", "collator", "model", "pipeline", "streaming",
         "loaders", "cache", "cli", "training", "config")
PROBE_TIMEOUT_S = 120
"""A probe running longer than this is stopped and reported as a harness error (probes are sized to take well
under a second or two, subprocess probes about ten seconds)."""


# ------------------------------------------------------------------------------------------------- the probes
@dataclass
class Probe:
    id: str
    area: str
    description: str
    expected: str
    build: object  # (env) -> Trial


@dataclass
class Trial:
    """What a probe does: `act()` is the toolkit call whose exception or result is classified; `check(result)`
    returns None when the result is right, else what is wrong; `after()` (optional) is checked whatever `act` did
    and returns a finding that makes the outcome silent garbage (e.g. a non-finite checkpoint left behind by a run
    that then stopped with an error). `kind` is "call" (in-process), "cli" (a `CliRun`: the mister-e rules) or
    "script" (a `CliRun` of examples/run_erc.py)."""

    act: object
    check: object = None
    after: object = None
    kind: str = "call"
    locate: list[str] | None = None
    """Words a named error's message must hold to count as named (e.g. the bad file's name): an error that points
    elsewhere (a batch position instead of the file) is an obscure crash."""


PROBES: list[Probe] = []


def probe(area: str, name: str, description: str, expected: str):
    assert area in AREAS and expected in (NAMED, FINITE, EITHER), (area, expected)

    def register(build):
        PROBES.append(Probe(f"{area}/{name}", area, description, expected, build))
        return build

    return register


class HarnessError(Exception):
    """Raised by the harness when its own set-up cannot run a probe."""


# -------------------------------------------------------------------------------------------- classification
PACKAGE_DIR: Path | None = None  # the imported mister_e_hf package folder (set in main)
SCRIPT_PATHS: tuple[str, ...] = ()  # examples/run_erc.py of the source tree, whose raises also count as toolkit's


def _in_toolkit(filename: str) -> bool:
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return (PACKAGE_DIR is not None and PACKAGE_DIR in path.parents) or str(path) in SCRIPT_PATHS


def _last_frame(tb):
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _is_raise(tb) -> bool:
    """Whether the traceback's frame stopped on a `raise` statement (not on an operation that failed)."""
    for instruction in dis.get_instructions(tb.tb_frame.f_code):
        if instruction.offset == tb.tb_lasti:
            return instruction.opname in ("RAISE_VARARGS", "RERAISE")
    return False


STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def _from_toolkit_via_stdlib(error: BaseException) -> bool:
    """Whether the frames below the last toolkit frame are all the standard library's (e.g. the toolkit's own
    `Path.mkdir` failing), not a third-party library's (e.g. datasets failing to open a file)."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    toolkit = [i for i, name in enumerate(frames) if _in_toolkit(name)]
    if not toolkit:
        return False
    below = frames[toolkit[-1] + 1:]
    return all(STDLIB in Path(name).resolve().parents and "site-packages" not in name for name in below)


def first_line(text: str, limit: int = 300) -> str:
    """The first line of a message (with the next one when the first only introduces it, ending in ':')."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_sentence(message: str) -> bool:
    """A message that says something (several words), not a bare key or value."""
    return len(message.split()) >= 3 and any(c.isalpha() for c in message)


def classify_exception(error: BaseException) -> tuple[str, str]:
    """`(outcome, finding)` of an exception raised by a probe's toolkit call."""
    tb = _last_frame(error.__traceback__) if error.__traceback__ is not None else None
    where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else "?"
    message = first_line(error) or repr(error)
    text = f"{type(error).__name__} at {where}: {message}"
    if type(error).__module__.startswith("huggingface_hub") and type(error).__name__.startswith("StrictDataclass"):
        # MisterEConfig is a strict dataclass: huggingface_hub runs its declared field types and its validator
        if error.__cause__ is not None and classify_exception(error.__cause__)[0] == NAMED:
            return NAMED, text + " (the toolkit's config validator, wrapped by the strict dataclass)"
        if type(error).__name__ == "StrictDataclassFieldValidationError":
            return NAMED, text + " (the config's declared field type, checked by the strict dataclass)"
    own_type = type(error).__module__.split(".")[0] == "mister_e_hf"
    deliberate = tb is not None and _in_toolkit(tb.tb_frame.f_code.co_filename) and _is_raise(tb)
    if (own_type or deliberate) and is_sentence(message):
        return NAMED, text
    if isinstance(error, OSError) and getattr(error, "filename", None) and _from_toolkit_via_stdlib(error):
        return NAMED, text + " (operating-system error naming the path, from the toolkit's own file access)"
    if own_type or deliberate:
        return OBSCURE, text + " (raised by the toolkit, but the message is not a sentence)"
    return OBSCURE, text


@dataclass
class CliRun:
    """What a command-line run gave: exit status, standard output and error, files it wrote (`folder`), and the
    exception behind a one-line CLI error where the run was in-process."""

    code: int
    stdout: str
    stderr: str
    cause: BaseException | None = None
    folder: Path | None = None


def _exit_zero(run: CliRun, check, expected: str) -> tuple[str, str]:
    finding = check(run) if check else None
    if expected == NAMED and not finding:
        finding = f"exit 0: {first_line(run.stdout) or '(no output)'}"
    return (GARBAGE, finding) if finding else (FINITE, "exit 0, output validated")


def classify_cli(run: CliRun, check, expected: str) -> tuple[str, str]:
    """mister-e: exit 0 is checked like a result; otherwise a traceback is an obscure crash and a one-line
    `mister-e: error:` (`mister-e <command>: error:` from argument parsing) is a named error, unless the error
    behind it was an obscure one (in-process runs)."""
    if run.code == 0:
        return _exit_zero(run, check, expected)
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if "Traceback (most recent call last)" in run.stderr:
        return OBSCURE, f"exit {run.code}, traceback: {first_line(last)}"
    if re.match(r"mister-e( [\w-]+)?: error:", last):
        message = last.split("error:", 1)[1].strip()
        if run.cause is not None:
            outcome, finding = classify_exception(run.cause)
            if outcome != NAMED:
                return OBSCURE, f"exit {run.code}, one-line error from an obscure cause: {finding}"
        return (NAMED if is_sentence(message) else OBSCURE), f"exit {run.code}: {first_line(last)}"
    return OBSCURE, f"exit {run.code} without a one-line error: {first_line(last) or '(no stderr)'}"


def classify_script(run: CliRun, check, expected: str) -> tuple[str, str]:
    """examples/run_erc.py: exit 0 is checked; a failure is named when its traceback (if any) ends in a `raise` of
    the toolkit or the script, with a sentence as the final line."""
    if run.code == 0:
        return _exit_zero(run, check, expected)
    lines = [line for line in run.stderr.rstrip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if run.code < 0:
        return OBSCURE, f"killed by signal {-run.code}"
    if "Traceback (most recent call last)" not in run.stderr:
        return (NAMED if is_sentence(last) else OBSCURE), f"exit {run.code}: {first_line(last)}"
    start = run.stderr.rfind("Traceback (most recent call last)")
    block = run.stderr[start:].splitlines()
    frames = [i for i, line in enumerate(block) if line.strip().startswith('File "')]
    if not frames:
        return OBSCURE, f"exit {run.code}: {first_line(last)}"
    bottom = block[frames[-1]].strip()
    filename = bottom.split('"')[1]
    source = block[frames[-1] + 1].strip() if frames[-1] + 1 < len(block) else ""
    message = last.split(":", 1)[1].strip() if ":" in last else last
    if _in_toolkit(filename) and source.startswith("raise") and is_sentence(message):
        return NAMED, f"exit {run.code}: {first_line(last)}"
    return OBSCURE, f"exit {run.code}, traceback ends in {Path(filename).name}: {first_line(last)}"


class ProbeTimeout(BaseException):
    """Raised by the alarm when a probe runs past `PROBE_TIMEOUT_S` (a BaseException: no `except Exception` in the
    toolkit swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def alarm(signum, frame):
        raise ProbeTimeout(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def scrub(text: str, env) -> str:
    """`text` without this machine's paths (the temporary folder, the source tree, the environment, home), which the
    committed results must not hold."""
    replacements = [(str(env.folder), "<tmp>"), (str(env.source_root), "<source>"), (str(REPO_ROOT), "<repo>"),
                    (sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (str(Path.home()), "~"),
                    (tempfile.gettempdir().rstrip("/") + "/", "<tmp>/")]
    for old, new in sorted(replacements, key=lambda pair: -len(pair[0])):
        if old and old not in ("/", "."):
            text = text.replace(old, new)
    return text


def run_probe(item: Probe, env) -> dict:
    record = {"id": item.id, "area": item.area, "description": item.description, "expected": item.expected}
    start = time.perf_counter()
    try:
        with time_limit(PROBE_TIMEOUT_S):
            outcome, finding = _run(item, env)
    except ProbeTimeout as error:
        outcome, finding = HARNESS, f"probe {error}"
    record.update(outcome=outcome, finding=scrub(finding, env), seconds=round(time.perf_counter() - start, 3))
    record["passed"] = outcome != HARNESS and (outcome == item.expected or (
        item.expected == EITHER and outcome in (NAMED, FINITE)))
    return record


def _run(item: Probe, env) -> tuple[str, str]:
    try:
        trial = item.build(env)
    except Exception as error:
        return HARNESS, f"set-up failed: {type(error).__name__}: {first_line(error)} [{_where(error)}]"
    result, error = None, None
    with contextlib.ExitStack() as stack:
        if trial.kind == "call":  # keep the toolkit's log and warnings off the table
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        try:
            result = trial.act()
        except Exception as raised:  # noqa: BLE001 -- classifying it is the point
            error = raised
    try:
        if trial.kind == "cli":
            outcome, finding = classify_cli(result, trial.check, item.expected)
        elif trial.kind == "script":
            outcome, finding = classify_script(result, trial.check, item.expected)
        elif error is not None:
            outcome, finding = classify_exception(error)
            missing = [word for word in trial.locate or () if word not in str(error)]
            if outcome == NAMED and missing:
                outcome, finding = OBSCURE, f"{finding} (does not name {', '.join(missing)})"
        else:
            finding = trial.check(result) if trial.check is not None else None
            if item.expected == NAMED and finding is None:
                finding = f"returned without error: {summarize(result)}"
            outcome, finding = (GARBAGE, finding) if finding else (FINITE, "result validated")
        if trial.after is not None:
            problem = trial.after()
            if problem and problem not in finding:
                outcome, finding = GARBAGE, f"{problem} (the call itself: {finding})"
    except Exception as harness_error:
        if trial.kind != "call" and result is None and error is not None:
            return HARNESS, f"the run itself failed: {type(error).__name__}: {first_line(error)} [{_where(error)}]"
        return HARNESS, (f"validator failed: {type(harness_error).__name__}: {first_line(harness_error)} "
                         f"[{_where(harness_error)}]")
    return outcome, finding


def _where(error: BaseException) -> str:
    tb = _last_frame(error.__traceback__) if error.__traceback__ else None
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"


def summarize(value, limit: int = 160) -> str:
    """A short description of what a call returned, for the finding of a probe that expected an error."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)} {value.dtype}"
        if isinstance(value, dict):
            parts = []
            for key, v in list(value.items())[:6]:
                parts.append(f"{key}: {tuple(v.shape)}" if hasattr(v, "shape") else f"{key}: {type(v).__name__}")
            text = "{" + ", ".join(parts) + "}"
        elif isinstance(value, tuple) and len(value) == 2 and hasattr(value[1], "logits"):
            text = f"model outputs, logits {tuple(value[1].logits.shape)}"
        elif isinstance(value, list):
            text = f"list of {len(value)}"
        else:
            text = repr(value)
    except Exception:  # noqa: BLE001
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------- fixtures
WORDS = ("hello there how are you i am fine thanks what a day oh no really great terrible wow okay sure why not "
         "the cat sat on mat we should go now please stop it that is so funny sorry about this yes").split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]"]
SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(32, 32),
              conv_stride=(5, 4), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=37)
TINY_HEAD = dict(projection_dim=16, context_hidden_size=8, expert_hidden_size=16, gate_hidden_size=8,
                 cross_attention_heads=2, cross_attention_layers=1)
LABELS = ["angry", "calm", "happy", "sad"]
RATE = 16000


class Env:
    """Tiny random models, processors, files and corpora, built once per run in a temporary folder."""

    def __init__(self, folder: Path, source_root: Path):
        self.folder, self.source_root = folder, source_root
        self._made: dict = {}

    def once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def path(self, *parts) -> Path:
        path = self.folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def fresh_folder(self, name: str) -> Path:
        """A new empty folder (a unique name per call)."""
        count = self._made.setdefault(("count", name), [0])
        count[0] += 1
        path = self.folder / f"{name}-{count[0]}"
        path.mkdir(parents=True)
        return path

    # ---------------------------------------------------------------------------------------- tokenizer etc.
    @property
    def tokenizer(self):
        def make():
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            model.pre_tokenizer = pre_tokenizers.Whitespace()
            model.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
            return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]",
                                           cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]",
                                           eos_token="[EOS]", mask_token="[MASK]")

        return self.once("tokenizer", make)

    @staticmethod
    def feature_extractor(normalize: bool = True):
        from transformers import Wav2Vec2FeatureExtractor

        return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, do_normalize=normalize,
                                        return_attention_mask=True)

    @staticmethod
    def image_processor():
        from transformers import ViTImageProcessor

        return ViTImageProcessor(size={"height": 32, "width": 32})

    def processor(self, speech: bool = True, text: bool = True, visual: bool = False, normalize: bool = True,
                  **kwargs):
        from mister_e_hf import MisterEProcessor

        return MisterEProcessor(feature_extractor=self.feature_extractor(normalize) if speech else None,
                                tokenizer=self.tokenizer if text else None,
                                image_processor=self.image_processor() if visual else None, **kwargs)

    # -------------------------------------------------------------------------------------------------- models
    MODALITIES = {"av": (True, True, False), "text": (False, True, False), "speech": (True, False, False),
                  "visual": (False, True, True)}

    def config(self, kind: str, text_positions: int = 512, **overrides):
        from transformers import BertConfig, ViTConfig, Wav2Vec2Config

        from mister_e_hf import MisterEConfig

        head = {**TINY_HEAD, "id2label": dict(enumerate(LABELS)), **overrides}
        if kind == "emb":
            return MisterEConfig(speech_embed_dim=8, text_embed_dim=8, **head)
        speech, text, visual = self.MODALITIES[kind]
        speech_config = Wav2Vec2Config(**SPEECH, feat_extract_norm="layer", do_stable_layer_norm=True)
        text_config = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=0,
                                 max_position_embeddings=text_positions, **TEXT)
        return MisterEConfig(speech_config=speech_config if speech else None, text_config=text_config if text else None,
                             visual_config=ViTConfig(**VIT) if visual else None, **head)

    def build(self, kind: str, seed: int = 0, **overrides):
        """A new `(model in eval mode, processor)` of `kind`: av (wav2vec2 + BERT), text, speech, visual (BERT +
        ViT), emb (embeddings mode, 8-d speech and text); `causal=True` for a causal context."""
        import torch

        from mister_e_hf import MisterEModel

        if overrides.pop("causal", False):
            overrides["context_bidirectional"] = False
        normalize = overrides.pop("normalize", True)
        torch.manual_seed(seed)
        model = MisterEModel(self.config(kind, **overrides)).eval()
        if kind == "emb":
            return model, None
        speech, text, visual = self.MODALITIES[kind]
        return model, self.processor(speech, text, visual, normalize=normalize)

    def model(self, kind: str, **overrides):
        """A shared `(model, processor)`: never modify it (use `build` for a model to change)."""
        key = ("model", kind, tuple(sorted(overrides.items())))
        return self.once(key, lambda: self.build(kind, **overrides))

    def backbones(self) -> dict[str, Path]:
        """Tiny random backbones saved like Hub checkpoints: `speech` (wav2vec2 + feature extractor), `text` (BERT of
        512 positions + tokenizer) and `text-64` (BERT of 64 positions)."""
        def make():
            import torch
            from transformers import BertModel, Wav2Vec2Config, Wav2Vec2Model

            folders = {name: self.path("backbones", name) for name in ("speech", "text", "text-64")}
            torch.manual_seed(0)
            Wav2Vec2Model(Wav2Vec2Config(**SPEECH, feat_extract_norm="layer", do_stable_layer_norm=True)
                          ).save_pretrained(folders["speech"])
            self.feature_extractor().save_pretrained(folders["speech"])
            for name, positions in (("text", 512), ("text-64", 64)):
                BertModel(self.config("text", text_positions=positions).text_config).save_pretrained(folders[name])
                self.tokenizer.save_pretrained(folders[name])
            return folders

        return self.once("backbones", make)

    # --------------------------------------------------------------------------------------------------- files
    def wav(self, name: str, seconds: float = 0.5, rate: int = RATE, channels: int = 1, subtype: str = "PCM_16",
            nan: bool = False) -> Path:
        def make():
            import numpy as np
            import soundfile

            rng = np.random.default_rng(len(name))
            samples = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
            if nan:
                samples[len(samples) // 2] = np.nan
            path = self.path("audio", f"{name}.wav")
            soundfile.write(path, samples if channels > 1 else samples[:, 0], rate, subtype=subtype)
            return path

        return self.once(("wav", name), make)

    def truncated_wav(self) -> Path:
        """A PCM WAV whose header promises 1 s but whose data section stops after 0.25 s."""
        def make():
            source = self.wav("full-second", seconds=1.0)
            data = source.read_bytes()
            path = self.path("audio", "truncated.wav")
            path.write_bytes(data[: 44 + (len(data) - 44) // 4])
            return path

        return self.once("truncated-wav", make)

    def text_file(self, name: str, content: bytes = b"this is not audio at all\n") -> Path:
        path = self.path("files", name)
        if not path.exists():
            path.write_bytes(content)
        return path

    def png(self, name: str = "frame.png", truncated: bool = False) -> Path:
        def make():
            import numpy as np
            from PIL import Image

            path = self.path("images", name)
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
            if truncated:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 3])
            return path

        return self.once(("png", name, truncated), make)


# ------------------------------------------------------------------------------------------------ validators
def audio(samples: int = 8000, seed: int = 0, scale: float = 0.1):
    import numpy as np

    return (scale * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def words(n: int, seed: int = 0) -> str:
    import numpy as np

    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n))


def forward(model, processor, conversations, **model_kwargs):
    """`(inputs, outputs)` of the processor and a no-grad forward."""
    import torch

    inputs = processor(conversations=conversations, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, **model_kwargs)
    return inputs, outputs


def output_problem(outputs, lengths: list[int] | None = None, atol: float = 1e-3) -> str | None:
    """None when a forward's outputs are right: finite log-probabilities summing to 1 and gate weights summing to 1
    over the available experts (0 elsewhere) at every real utterance, and `lengths` utterances per conversation."""
    import torch

    mask = outputs.utterance_mask.bool()
    if lengths is not None and mask.sum(1).tolist() != list(lengths):
        return f"utterances per conversation {mask.sum(1).tolist()}, expected {list(lengths)}"
    logits = outputs.logits.float()[mask]
    if not torch.isfinite(logits).all():
        return f"non-finite logits at {int((~torch.isfinite(logits)).any(-1).sum())} of {len(logits)} real utterances"
    total = logits.exp().sum(-1)
    if not torch.allclose(total, torch.ones_like(total), atol=atol):
        return f"class probabilities sum to {total.tolist()[:4]}, not 1"
    gates, available = outputs.gate_weights.float(), outputs.expert_mask.bool()
    if not torch.isfinite(gates[mask]).all():
        return "non-finite gate weights"
    sums = (gates * available).sum(-1)[mask]
    if not torch.allclose(sums, torch.ones_like(sums), atol=atol):
        return f"gate weights sum to {sums.tolist()[:4]} over the available experts, not 1"
    unavailable = ~available & mask.unsqueeze(-1)
    if (gates[unavailable].abs() > atol).any():
        return "unavailable experts get gate weight"
    return None


def forward_check(lengths=None, atol: float = 1e-3):
    """check(result) for `forward(...)`'s `(inputs, outputs)`."""
    return lambda result: output_problem(result[1], lengths, atol)


def close_problem(a, b, what: str, atol: float = 1e-4) -> str | None:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"{what}: shape {a.shape}, expected {b.shape}"
    if not np.isfinite(a).all():
        return f"{what}: non-finite values"
    gap = float(np.abs(a - b).max()) if a.size else 0.0
    return None if gap <= atol else f"{what} differ from the correct ones by up to {gap:.3g}"


def absent_text_reference(model, processor, conversation: list[dict], positions: list[int]):
    """Outputs for `conversation` where the utterances at `positions` have no text: a placeholder text is
    tokenised and then marked absent in `text_mask`, which is what a missing transcript means to the model."""
    import torch

    filled = [dict(u, text="hello") if u_index in positions else dict(u) for u_index, u in enumerate(conversation)]
    inputs = processor(conversations=[filled], return_tensors="pt")
    for u in positions:
        inputs["text_mask"][0, u] = 0
    with torch.no_grad():
        return model(**inputs)


def same_as_absent_text(model, processor, conversation, positions, atol: float = 1e-4):
    """check(result) of a forward: outputs equal to those with no text at `positions`."""
    def check(result):
        problem = output_problem(result[1], [len(conversation)])
        if problem:
            return problem
        reference = absent_text_reference(model, processor, conversation, positions)
        problem = close_problem(result[1].logits, reference.logits, "logits (against absent text)", atol)
        if problem is None:
            problem = close_problem(result[1].gate_weights, reference.gate_weights, "gate weights (against absent "
                                    "text)", atol)
        return problem

    return check


@contextlib.contextmanager
def captured_logs():
    """Collects the messages logged (at WARNING and above, any logger, transformers' included) and warned."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("mister_e_hf")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            messages.extend(str(w.message) for w in caught)
            for logger in loggers:
                logger.removeHandler(handler)


def with_logs(call):
    """`(call(), logged messages)`."""
    with captured_logs() as messages:
        result = call()
    return result, messages


def warned(messages: list[str], *needles: str) -> bool:
    return any(all(n in m.lower() for n in needles) for m in messages)


# =========================================================================================== processor: text
def _utt(text=..., **extra) -> dict:
    utterance = dict(extra)
    if text is not ...:
        utterance["text"] = text
    return utterance


def _text_only_refused(value):
    def build(env):
        model, processor = env.model("text")
        conversation = [{"text": "hello there how are you"}, _utt(value)]
        return Trial(lambda: forward(model, processor, [conversation]))

    return build


for _name, _value, _what in (("empty", "", "''"), ("whitespace", "  \n\t ", "whitespace-only"),
                             ("none", None, "None")):
    probe("processor-text", f"{_name}-text-only-modality",
          f"text model, an utterance whose text is {_what} and nothing else: nothing to recognise", NAMED)(
        _text_only_refused(_value))


def _blank_with_audio(value):
    def build(env):
        model, processor = env.model("av")
        conversation = [{"text": "oh no really", "audio": audio(seed=1), "sampling_rate": RATE},
                        _utt(value, audio=audio(seed=2), sampling_rate=RATE),
                        {"text": "that is so funny", "audio": audio(seed=3), "sampling_rate": RATE}]
        return Trial(lambda: forward(model, processor, [conversation]),
                     same_as_absent_text(model, processor, conversation, [1]))

    return build


for _name, _value, _what in (("empty", "", "''"), ("whitespace", "   ", "whitespace-only"), ("none", None, "None"),
                             ("missing-key", ..., "absent (no `text` key)")):
    probe("processor-text", f"{_name}-text-with-audio",
          f"speech+text model, an utterance with audio and text {_what}: audio-only, exactly like absent text",
          FINITE)(_blank_with_audio(_value))


@probe("processor-text", "blank-text-in-batch", "a blank-text utterance (with audio) inside a batch of two "
       "conversations gives the same outputs as its conversation alone with the text absent", FINITE)
def _(env):
    model, processor = env.model("av")
    first = [{"text": "", "audio": audio(seed=4), "sampling_rate": RATE}, {"text": "hello", "audio": audio(seed=5),
                                                                          "sampling_rate": RATE}]
    second = [{"text": "what a day oh no really great", "audio": audio(12000, seed=6), "sampling_rate": RATE}]

    def check(result):
        problem = output_problem(result[1], [2, 1])
        if problem:
            return problem
        reference = absent_text_reference(model, processor, first, [0])
        return close_problem(result[1].logits[0, :2], reference.logits[0], "logits of the batched conversation")

    return Trial(lambda: forward(model, processor, [first, second]), check)


def _long_text(n_words: int, positions: int, from_backbones: bool, want_warning: bool, **processor_kwargs):
    def build(env):
        if from_backbones:
            from mister_e_hf import MisterEModel, MisterEProcessor

            text = str(env.backbones()["text" if positions == 512 else "text-64"])
            model = env.once(("from-backbones-text", positions), lambda: MisterEModel.from_backbones(
                None, text, id2label=dict(enumerate(LABELS)), **TINY_HEAD).eval())
            processor = MisterEProcessor.from_backbones(None, text, **processor_kwargs)
        else:
            model, _ = env.model("text", text_positions=positions)
            processor = env.processor(speech=False, **processor_kwargs)
        conversation = [{"text": words(n_words)}, {"text": "sure why not"}]

        def check(result):
            (_, outputs), messages = result
            problem = output_problem(outputs, [2])
            if problem is None and want_warning and not warned(messages, "truncat"):
                problem = "finite, but the truncation was not warned about"
            return problem

        return Trial(lambda: with_logs(lambda: forward(model, processor, [conversation])), check)

    return build


probe("processor-text", "700-tokens-hand-built-no-limit", "text of 700 words, processor built by hand with "
      "`max_text_length=None` (its tokenizer knows no limit), 512-position backbone: truncated, or refused clearly",
      EITHER)(_long_text(700, 512, False, False, max_text_length=None))
probe("processor-text", "700-tokens-from-backbones", "text of 700 words, `from_backbones` processor and model (BERT of "
      "512 positions): truncated to the backbone's maximum, with a warning", FINITE)(_long_text(700, 512, True, True))
probe("processor-text", "beyond-positions-from-backbones", "text of 100 words, `from_backbones` processor and model "
      "(BERT of 64 positions): truncated to 64, with a warning", FINITE)(_long_text(100, 64, True, True))


def _odd_text(text):
    def build(env):
        model, processor = env.model("text")
        return Trial(lambda: forward(model, processor, [[{"text": text}, {"text": "okay"}]]), forward_check([2]))

    return build


probe("processor-text", "unicode", "emoji, CJK and accented text (all unknown words)", FINITE)(
    _odd_text("😀 日本語のテキスト ñandú"))


def _bad_batch(conversations):
    def build(env):
        model, processor = env.model("text")
        return Trial(lambda: forward(model, processor, conversations))

    return build


for _name, _value, _what in (
    ("conversations-none", None, "conversations=None"),
    ("empty-conversation", [[{"text": "hello"}], []], "a batch holding an empty conversation"),
):
    probe("processor-text", _name, f"processor called with {_what}", NAMED)(_bad_batch(_value))


@probe("processor-text", "200-utterances", "one conversation of 200 utterances", FINITE)
def _(env):
    model, processor = env.model("text")
    conversation = [{"text": words(3, seed=i)} for i in range(200)]
    return Trial(lambda: forward(model, processor, [conversation]), forward_check([200]))


@probe("processor-text", "unknown-keyword", "processor(conversations=..., padding='max_length'): an argument the "
       "processor does not take", NAMED)
def _(env):
    _, processor = env.model("text")
    return Trial(lambda: processor(conversations=[[{"text": "hi"}]], padding="max_length"))


# ========================================================================================== processor: audio
def _av_forward(utterance_audio: dict, lengths=(2,)):
    """Probe builder: an av model on a conversation whose second utterance carries `utterance_audio` (and text)."""
    def build(env):
        model, processor = env.model("av")
        value = utterance_audio(env) if callable(utterance_audio) else utterance_audio
        conversation = [{"text": "hello there", "audio": audio(seed=7), "sampling_rate": RATE},
                        {"text": "oh no really", **value}]
        return Trial(lambda: forward(model, processor, [conversation]), forward_check(list(lengths)))

    return build


def speech_values(processor, utterance: dict):
    """The processor's `input_values` `(samples,)` of one utterance (speech-only processor)."""
    inputs = processor(conversations=[[utterance]], return_tensors="pt")
    length = int(inputs["speech_attention_mask"][0, 0].sum())
    return inputs["input_values"][0, 0, :length].numpy()


def _scaled(make, reference, what: str):
    """Probe builder: raw samples (no normalisation in the feature extractor) given as `make()` must give the same
    `input_values` as the float32 samples `reference(raw)` (what soundfile returns for the same PCM)."""
    def build(env):
        processor = env.processor(speech=True, text=False, normalize=False)
        raw = make()

        def check(values):
            expected = speech_values(processor, {"audio": reference(raw), "sampling_rate": RATE})
            return close_problem(values, expected, f"input_values of {what}", atol=1e-5)

        return Trial(lambda: speech_values(processor, {"audio": raw, "sampling_rate": RATE}), check)

    return build


def _pcm(dtype: str):
    import numpy as np

    samples = audio(8000, seed=8, scale=0.3).clip(-1, 1)
    if dtype == "int16":
        return (samples * 32767).astype(np.int16)
    if dtype == "int32":
        return (samples.astype(np.float64) * 2147483647).astype(np.int32)
    return (samples * 127 + 128).astype(np.uint8)


probe("processor-audio", "int16", "int16 PCM array: scaled to [-1, 1] as soundfile scales it (x / 32768)", FINITE)(
    _scaled(lambda: _pcm("int16"), lambda x: x.astype("float32") / 32768, "int16 audio"))
probe("processor-audio", "int32", "int32 PCM array: scaled to [-1, 1] (x / 2**31)", FINITE)(
    _scaled(lambda: _pcm("int32"), lambda x: (x.astype("float64") / 2 ** 31).astype("float32"), "int32 audio"))
probe("processor-audio", "uint8", "uint8 PCM array (8-bit WAV's unsigned samples): scaled as (x - 128) / 128", FINITE)(
    _scaled(lambda: _pcm("uint8"), lambda x: (x.astype("float32") - 128) / 128, "uint8 audio"))
probe("processor-audio", "float64", "float64 samples: the same as float32", FINITE)(
    _scaled(lambda: audio(8000, seed=9).astype("float64"), lambda x: x.astype("float32"), "float64 audio"))


def _mixdown(axis: int):
    def build(env):
        import numpy as np

        processor = env.processor(speech=True, text=False, normalize=False)
        stereo = np.stack([audio(6000, seed=11), audio(6000, seed=12)], axis=axis)

        def check(values):
            expected = speech_values(processor, {"audio": stereo.mean(axis=axis), "sampling_rate": RATE})
            return close_problem(values, expected, "input_values of the mixed-down 2-D audio", atol=1e-5)

        return Trial(lambda: speech_values(processor, {"audio": stereo, "sampling_rate": RATE}), check)

    return build


probe("processor-audio", "2d-channels-first", "2-D audio (2, 6000): mixed down to mono, or refused", EITHER)(
    _mixdown(0))


def _np(expression):
    return lambda env: {"audio": expression(), "sampling_rate": RATE}


for _name, _make, _what in (
    ("empty", lambda: audio(0), "an empty array"),
    ("10-samples", lambda: audio(10), "10 samples (shorter than the backbone's receptive field)"),
    ("nan", lambda: np.where(np.arange(8000) == 4000, float("nan"),
                                              audio(8000)).astype("float32"), "one NaN sample"),
    ("inf", lambda: np.where(np.arange(8000) == 10, float("inf"),
                                              audio(8000)).astype("float32"), "one infinite sample"),
    ("complex", lambda: (audio(8000) + 1j * audio(8000, seed=3)).astype("complex64"), "complex samples"),
):
    probe("processor-audio", _name, f"speech+text model, audio given as {_what}", NAMED)(_av_forward(_np(_make)))


probe("processor-audio", "400-samples", "25 ms of audio (400 samples, the wav2vec2 family's receptive field)",
      FINITE)(_av_forward({"audio": audio(400), "sampling_rate": RATE}))


def _rate(rate, samples: int = 8000, expected_seconds: float | None = None):
    """Processor-level probe of a sampling rate: a result must hold `expected_seconds` of audio at 16 kHz."""
    def build(env):
        processor = env.processor(speech=True, text=False)
        utterance = {"audio": audio(samples, seed=13)}
        if rate is not ...:
            utterance["sampling_rate"] = rate

        def check(values):
            if expected_seconds is None:
                return f"accepted: {len(values)} samples ({len(values) / RATE:.3g} s) at 16 kHz"
            if abs(len(values) - expected_seconds * RATE) > 2:
                return f"{len(values)} samples at 16 kHz, expected {expected_seconds * RATE:.0f}"
            return close_problem(values, speech_values(processor, {"audio": audio(samples, seed=13),
                                                                   "sampling_rate": RATE}) if rate == RATE else values,
                                 "input_values", atol=1e-5)

        return Trial(lambda: speech_values(processor, utterance), check)

    return build


for _name, _rate_value, _what in (
    ("rate-0", 0, "0"), ("rate-1", 1, "1 Hz (100 samples would become 100 s)"), ("rate-negative", -1, "-1"),
    ("rate-none", None, "None, for an array"),
    ("rate-huge", 10 ** 9, "1e9 Hz (8000 samples would become a fraction of a sample)"),
):
    probe("processor-audio", _name, f"an audio array with `sampling_rate` {_what}", NAMED)(
        _rate(_rate_value, 100 if _rate_value == 1 else 8000))
probe("processor-audio", "rate-float", "`sampling_rate=16000.0` (a float holding a whole number): the same as 16000, "
      "or refused", EITHER)(_rate(16000.0, expected_seconds=0.5))
probe("processor-audio", "rate-8000", "8 kHz audio: resampled to 16 kHz (twice the samples)", FINITE)(
    _rate(8000, expected_seconds=1.0))


@probe("processor-audio", "10-minute-clip", "a 10-minute clip (the model would run for many minutes with no word): "
       "refused by a length limit, or truncated with a warning", EITHER)
def _(env):
    processor = env.processor(speech=True, text=False)
    clip = audio(600 * RATE, seed=14, scale=0.05)

    def check(result):
        values, messages = result
        seconds = len(values) / RATE
        if seconds > 120:
            return f"accepted all {seconds:.0f} s without a limit or a warning"
        if not warned(messages, "truncat"):
            return f"cut to {seconds:.0f} s without a warning"
        return None

    return Trial(lambda: with_logs(lambda: speech_values(processor, {"audio": clip, "sampling_rate": RATE})), check)


def _file_probe(make_path, **extra):
    return _av_forward(lambda env: {"audio": str(make_path(env)), **extra})


for _name, _make, _what in (
    ("missing-file", lambda env: env.folder / "nowhere" / "absent.wav", "a path that does not exist"),
    ("truncated-wav", lambda env: env.truncated_wav(), "a WAV file cut inside its data section (header promises 1 s, "
                                                      "0.25 s present)"),
    ("non-audio-file", lambda env: env.text_file("notes.wav"), "a text file named .wav"),
    ("empty-file", lambda env: env.text_file("empty.wav", b""), "an empty (0-byte) .wav file"),
    ("nan-wav", lambda env: env.wav("nan-float", subtype="FLOAT", nan=True), "a float WAV holding a NaN sample"),
):
    probe("processor-audio", _name, f"audio given as {_what}", NAMED)(_file_probe(_make))


def _file_values(make_path, reference):
    """Processor-level: a WAV path must give the same `input_values` as `reference(path)` (float32 mono samples)."""
    def build(env):
        processor = env.processor(speech=True, text=False, normalize=False)
        path = make_path(env)

        def check(values):
            samples, rate = reference(path)
            return close_problem(values, speech_values(processor, {"audio": samples, "sampling_rate": rate}),
                                 "input_values of the file", atol=1e-5)

        return Trial(lambda: speech_values(processor, {"audio": path}), check)

    return build


def _soundfile_mono(path):
    import soundfile

    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


probe("processor-audio", "wav-int16-file", "a 16-bit PCM WAV path: its samples as soundfile reads them", FINITE)(
    _file_values(lambda env: str(env.wav("plain")), _soundfile_mono))
probe("processor-audio", "wav-stereo", "a stereo WAV: mixed down to mono", FINITE)(
    _file_values(lambda env: str(env.wav("stereo", channels=2)), _soundfile_mono))


# ========================================================================================== processor: image
def _image_forward(make_image, text="okay", lengths=(2,)):
    def build(env):
        model, processor = env.model("visual")
        image = make_image(env)
        second = {"image": image} if text is None else {"text": text, "image": image}
        conversation = [{"text": "hello there", "image": _frame()}, second]
        check = (same_as_absent_text(model, processor, conversation, [1]) if text is None
                 else forward_check(list(lengths)))
        return Trial(lambda: forward(model, processor, [conversation]), check)

    return build


def _frame(shape=(40, 48, 3), seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


for _name, _make, _what, _expected in (
    ("uint8-array", lambda env: _frame(), "a uint8 (H, W, 3) array", FINITE),
    ("png-path", lambda env: str(env.png()), "a PNG path", FINITE),
    ("1x1", lambda env: _frame((1, 1, 3)), "a 1x1 image", FINITE),
    ("empty", lambda env: _frame((0, 0, 3)), "an empty (0, 0, 3) array", NAMED),
    ("nan", lambda env: np.full((40, 48, 3), float("nan"), dtype="float32"), "a float array of NaN",
     NAMED),
    ("rgba", lambda env: _frame((40, 48, 4)), "an RGBA (H, W, 4) array", EITHER),
    ("missing-file", lambda env: str(env.folder / "nowhere.png"), "a path that does not exist", NAMED),
    ("truncated-png", lambda env: str(env.png("cut.png", truncated=True)), "a PNG cut to a third of its bytes",
     NAMED),
):
    probe("processor-image", _name, f"text+image model, an image given as {_what}", _expected)(
        _image_forward(_make))
probe("processor-image", "image-without-text", "text+image model, an utterance with an image and no text: "
      "image-only, exactly like absent text", FINITE)(_image_forward(lambda env: _frame(seed=3), text=None))


# ==================================================================================================== collator
def _collate(rows_of, processor_kind="av", check=None, label_columns=None, forward_kind=None):
    """Probe builder: `DataCollatorForConversations(processor)(rows_of(env))`; with `forward_kind`, the batch then
    goes through that model (embeddings mode: `emb`)."""
    def build(env):
        from mister_e_hf.data import DataCollatorForConversations

        processor = None if processor_kind is None else env.model(processor_kind)[1]
        collate = DataCollatorForConversations(processor, label_columns=label_columns)
        rows = rows_of(env)
        if forward_kind is None:
            return Trial(lambda: collate(rows), check)
        model = env.model(forward_kind)[0]

        def act():
            import torch

            batch = collate(rows)
            with torch.no_grad():
                return batch, model(**batch)

        return Trial(act, check or (lambda result: output_problem(result[1])))

    return build


def _rows(env, texts=("hello there", "oh no", "sure why not"), audio_count=None, labels=(0, 1, 2)):
    paths = [str(env.wav(f"row-{i}")) for i in range(len(texts) if audio_count is None else audio_count)]
    row = {"texts": list(texts), "audio": paths}
    if labels is not None:
        row["labels"] = list(labels)
    return row


def _labels_check(expected):
    def check(batch):
        got = batch["labels"].tolist()
        return None if got == expected else f"labels {got}, expected {expected}"

    return check


def _batch_check(lengths, text_mask=None, speech_mask=None, labels=None):
    def check(batch):
        got = batch["utterance_mask"].sum(1).tolist()
        if got != lengths:
            return f"utterances per conversation {got}, expected {lengths}"
        for name, want in (("text_mask", text_mask), ("speech_mask", speech_mask), ("labels", labels)):
            if want is not None and batch[name].tolist() != want:
                return f"{name} {batch[name].tolist()}, expected {want}"
        return None

    return check


probe("collator", "valid-rows", "two rows with audio paths, texts and labels", FINITE)(
    _collate(lambda env: [_rows(env), _rows(env, texts=("okay",), labels=(3,))],
             check=_batch_check([3, 1], labels=[[0, 1, 2], [3, -100, -100]])))
probe("collator", "audio-list-short", "a row with 3 texts but 2 audio paths", NAMED)(
    _collate(lambda env: [_rows(env, audio_count=2)],
             check=lambda b: f"{int(b['utterance_mask'].sum())} utterances kept of 3, speech_mask "
                             f"{b['speech_mask'].tolist()}"))
probe("collator", "labels-short", "a row with 3 texts but 1 label", NAMED)(
    _collate(lambda env: [_rows(env, labels=(2,))], check=lambda b: f"labels padded to {b['labels'].tolist()}"))
probe("collator", "label-fraction", "a label of 1.7", NAMED)(
    _collate(lambda env: [_rows(env, labels=(0, 1.7, 2))], check=lambda b: f"label 1.7 became {b['labels'].tolist()}"))
probe("collator", "label-string", "a label given as the string 'happy'", NAMED)(
    _collate(lambda env: [_rows(env, labels=(0, "happy", 2))]))
probe("collator", "label-minus-one", "a label of -1 (the loaders' unlabelled id): ignored as -100", FINITE)(
    _collate(lambda env: [_rows(env, labels=(0, -1, 2))], check=_labels_check([[0, -100, 2]])))
probe("collator", "empty-batch", "an empty list of rows", NAMED)(_collate(lambda env: []))
probe("collator", "missing-texts-column", "rows without a `texts` column", NAMED)(
    _collate(lambda env: [{k: v for k, v in _rows(env).items() if k != "texts"}]))
probe("collator", "texts-string", "`texts` given as one string instead of a list per turn", NAMED)(
    _collate(lambda env: [{"texts": "hello there", "audio": None, "labels": [0]}],
             check=lambda b: f"{int(b['utterance_mask'].sum())} utterances from one string"))
probe("collator", "missing-audio-file", "a row whose audio path does not exist", NAMED)(
    _collate(lambda env: [{**_rows(env), "audio": [str(env.folder / "gone.wav")] * 3}]))
probe("collator", "text-blank-with-audio", "a turn whose text is '' but has audio: audio-only, like None", FINITE)(
    _collate(lambda env: [_rows(env, texts=("hello", "", "okay"))],
             check=_batch_check([3], text_mask=[[1, 0, 1]], speech_mask=[[1, 1, 1]])))


def _cached_row(n=3, dim=8, nan_at=None, value=float("nan"), labels=True, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    row = {"texts": ["x"] * n, "num_turns": n}
    for modality in ("speech", "text"):
        embeds = rng.standard_normal((n, dim)).astype(np.float32)
        if nan_at is not None and modality == "speech":
            embeds[nan_at, 0] = value
        row[f"{modality}_embeds"], row[f"{modality}_present"] = embeds.tolist(), [1] * n
    if labels:
        row["labels"] = [0, 1, 2][:n] + [3] * max(0, n - 3)
    return row


probe("collator", "cached-valid", "rows of cached embeddings, through the embeddings-mode model", FINITE)(
    _collate(lambda env: [_cached_row(), _cached_row(2, seed=1)], processor_kind=None, forward_kind="emb"))
probe("collator", "cached-nan", "cached embeddings holding a NaN, through the model", NAMED)(
    _collate(lambda env: [_cached_row(nan_at=1)], processor_kind=None, forward_kind="emb"))
probe("collator", "cached-mixed-rows", "one row with cached embeddings, one without", NAMED)(
    _collate(lambda env: [_cached_row(), {"texts": ["hello"], "labels": [0], "num_turns": 1}], processor_kind=None))
probe("collator", "cached-dims-differ", "cached embeddings of 8 dimensions in one row, 6 in the other", NAMED)(
    _collate(lambda env: [_cached_row(), _cached_row(dim=6)], processor_kind=None))
probe("collator", "regression-text-value", "a regression label column holding the text 'abc'", NAMED)(
    _collate(lambda env: [{**_cached_row(labels=False), "valence": [0.5, "abc", 1.0]}], processor_kind=None,
             label_columns=["valence"]))


# ================================================================================================ model forward
def _embeds(batch=1, turns=3, dim=8, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {"speech_embeds": torch.randn(batch, turns, dim, generator=generator),
            "text_embeds": torch.randn(batch, turns, dim, generator=generator)}


def _emb_forward(make_inputs, check=None):
    """Probe builder: the embeddings-mode model on `make_inputs()` (a dict of forward arguments)."""
    def build(env):
        import torch

        model = env.model("emb")[0]
        inputs = make_inputs()

        def act():
            with torch.no_grad():
                return inputs, model(**inputs)

        return Trial(act, check(model) if check else forward_check())

    return build


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _nan_at(tensor, index, value=float("nan")):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def _equal_to(reference_inputs, atol=1e-4, what="logits", loss=False):
    """check(model): the outputs (or the loss) equal those of `reference_inputs()`."""
    def check(model):
        def compare(result):
            import torch

            inputs, outputs = result
            with torch.no_grad():
                reference = model(**reference_inputs())
            if loss:
                if outputs.loss is None or not torch.isfinite(outputs.loss):
                    return f"loss {outputs.loss}"
                return close_problem(outputs.loss, reference.loss, "loss", atol)
            return output_problem(outputs, atol=max(atol, 1e-3)) or close_problem(outputs.logits, reference.logits,
                                                                                   what, atol)

        return compare

    return check


class LazyEmbeds(Mapping):
    """`_embeds(**options)`, made on first use (so that listing the probes imports no torch)."""

    def __init__(self, **options):
        self.options, self.value = options, None

    def _get(self) -> dict:
        if self.value is None:
            self.value = _embeds(**self.options)
        return self.value

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())


E = LazyEmbeds()
E2 = LazyEmbeds(batch=2)
LONG_LABELS = [[0, 1, 2]]

probe("model", "embeds-valid-with-labels", "embeddings and labels: a finite loss", FINITE)(
    _emb_forward(lambda: _with(E, labels=torch.tensor(LONG_LABELS)),
                 _equal_to(lambda: _with(E, labels=torch.tensor(LONG_LABELS)), loss=True)))
probe("model", "nan-speech-embeds", "one NaN in `speech_embeds` at a real utterance", NAMED)(
    _emb_forward(lambda: _with(E, speech_embeds=_nan_at(E["speech_embeds"], (0, 1, 3)))))
probe("model", "inf-text-embeds", "one inf in `text_embeds` at a real utterance", NAMED)(
    _emb_forward(lambda: _with(E, text_embeds=_nan_at(E["text_embeds"], (0, 0, 0), float("inf")))))
probe("model", "nan-at-padding", "a NaN in `speech_embeds` at a padding position (utterance_mask 0): ignored, or "
      "refused", EITHER)(_emb_forward(
          lambda: _with(E2, speech_embeds=_nan_at(E2["speech_embeds"], (1, 2, 0)),
                        utterance_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])),
          _equal_to(lambda: _with(E2, speech_embeds=_nan_at(E2["speech_embeds"], (1, 2, 0), 0.0),
                                  utterance_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])))))
probe("model", "nan-where-modality-masked", "a NaN in `speech_embeds` where `speech_mask` is 0: ignored, or refused",
      EITHER)(_emb_forward(
          lambda: _with(E, speech_embeds=_nan_at(E["speech_embeds"], (0, 1, 0)),
                        speech_mask=torch.tensor([[1, 0, 1]])),
          _equal_to(lambda: _with(E, speech_embeds=_nan_at(E["speech_embeds"], (0, 1, 0), 0.0),
                                  speech_mask=torch.tensor([[1, 0, 1]])))))
probe("model", "speech-mask-wrong-shape", "`speech_mask` of shape (1, 4) for 3 utterances", NAMED)(
    _emb_forward(lambda: _with(E, speech_mask=torch.ones(1, 4, dtype=torch.long))))
probe("model", "utterance-count-mismatch", "`speech_embeds` for 3 utterances and `text_embeds` for 2", NAMED)(
    _emb_forward(lambda: _with(E, text_embeds=E["text_embeds"][:, :2])))
probe("model", "embeds-wrong-dim", "`speech_embeds` of 9 dimensions for a model of 8", NAMED)(
    _emb_forward(lambda: _with(E, speech_embeds=torch.randn(1, 3, 9))))
probe("model", "empty-batch", "embeddings of a batch of 0 conversations: empty outputs, or refused", EITHER)(
    _emb_forward(lambda: _embeds(batch=0),
                 lambda model: lambda result: None if tuple(result[1].logits.shape) == (0, 3, 4)
                 else f"logits of shape {tuple(result[1].logits.shape)}"))

for _name, _make, _what in (
    ("labels-bool", lambda t: t.tensor([[True, False, True]]), "a bool tensor"),
    ("labels-uint8", lambda t: t.tensor([[1, 0, 1]], dtype=t.uint8), "a uint8 tensor"),
    ("labels-numpy", lambda t: np.array([[1, 0, 1]]), "a numpy array"),
):
    probe("model", _name, f"labels given as {_what}: cast (the same loss as int64 labels) or refused", EITHER)(
        _emb_forward((lambda make: lambda: _with(E, labels=make(torch)))(_make),
                     _equal_to(lambda: _with(E, labels=torch.tensor([[1, 0, 1]])), loss=True)))
probe("model", "labels-out-of-range", "a label 4 for a model of 4 classes", NAMED)(
    _emb_forward(lambda: _with(E, labels=torch.tensor([[1, 4, 2]]))))
probe("model", "labels-wrong-shape", "labels of shape (1, 4) for 3 utterances", NAMED)(
    _emb_forward(lambda: _with(E, labels=torch.tensor([[1, 0, 1, 2]]))))
probe("model", "labels-all-ignored", "labels all -100 (nothing labelled): a finite loss (0), or refused", EITHER)(
    _emb_forward(lambda: _with(E, labels=torch.full((1, 3), -100)),
                 lambda model: lambda result: None if result[1].loss is not None and bool(
                     torch.isfinite(result[1].loss)) else f"loss {result[1].loss}"))

for _name, _cast, _what, _atol in (
    ("embeds-float64", lambda x: x.double(), "float64", 1e-4),
    ("embeds-fp16", lambda x: x.half(), "float16", 2e-2),
    ("embeds-int64", lambda x: x.round().long(), "int64 (rounded values)", 1e-4),
):
    probe("model", _name, f"embeddings given as {_what}: cast to the model's dtype (same outputs) or refused",
          EITHER)(_emb_forward((lambda cast: lambda: {k: cast(v) for k, v in E.items()})(_cast),
                               _equal_to((lambda rounded: lambda: {k: (v.round() if rounded else v)
                                                                   for k, v in E.items()})("int64" in _what), _atol)))


def _raw_inputs(env, kind="av", conversation=None, **processor_kwargs):
    model, processor = env.model(kind)
    conversation = conversation or [{"text": "hello there", "audio": audio(seed=20), "sampling_rate": RATE},
                                    {"text": "oh no really", "audio": audio(6000, seed=21), "sampling_rate": RATE},
                                    {"text": "okay"}]
    return model, processor(conversations=[conversation], return_tensors="pt")


def _raw_forward(change, expected_check=None, kind="av"):
    def build(env):
        import torch

        model, inputs = _raw_inputs(env, kind)
        changed = change(dict(inputs))

        def act():
            with torch.no_grad():
                return changed, model(**changed)

        return Trial(act, expected_check or forward_check([3]))

    return build


probe("model", "raw-valid-labels", "processor outputs with labels, in training mode: a finite loss", FINITE)(
    _raw_forward(lambda x: {**x, "labels": torch.tensor([[0, 1, 2]])},
                 lambda result: None if bool(torch.isfinite(result[1].loss)) else "non-finite loss"))
probe("model", "nan-input-values", "one NaN in `input_values` of the first utterance", NAMED)(
    _raw_forward(lambda x: {**x, "input_values": _nan_at(x["input_values"], (0, 0, 100))}))
probe("model", "input-ids-out-of-vocab", "`input_ids` holding the id 10**6", NAMED)(
    _raw_forward(lambda x: {**x, "input_ids": _nan_at(x["input_ids"], (0, 0, 1), 10 ** 6)}))
probe("model", "text-attention-all-zero", "`text_attention_mask` all 0 for an utterance marked as having text",
      EITHER)(_raw_forward(lambda x: {**x, "text_attention_mask": _nan_at(x["text_attention_mask"], (0, 0), 0)}))


def _low_precision(kind: str, dtype_name: str):
    def build(env):
        import torch

        dtype = getattr(torch, dtype_name)
        model = env.build(kind)[0].to(dtype)
        reference_model = env.model(kind)[0]
        inputs = (_embeds() if kind == "emb" else dict(_raw_inputs(env, kind)[1]))

        def act():
            with torch.no_grad():
                return inputs, model(**inputs)

        def check(result):
            with torch.no_grad():
                reference = reference_model(**inputs)
            lengths = None if kind == "emb" else [3]
            return output_problem(result[1], lengths, atol=2e-2) or close_problem(
                result[1].logits.float(), reference.logits, f"{dtype_name} logits (against float32)", atol=0.15)

        return Trial(act, check)

    return build


probe("model", "bf16-model-float32-inputs", "a speech+text model cast to bfloat16, fed the processor's float32 "
      "outputs: inputs cast to the model's dtype", FINITE)(_low_precision("av", "bfloat16"))
probe("model", "bf16-emb-model-float32-embeds", "an embeddings-mode model in bfloat16 fed float32 embeddings", FINITE)(
    _low_precision("emb", "bfloat16"))


@probe("model", "state-with-bidirectional", "`conversation_state` (streaming) given to a bidirectional model", NAMED)
def _(env):
    model = env.model("emb")[0]
    return Trial(lambda: model(**_embeds(turns=1), conversation_state={}))


@probe("model", "audio-less-utterance-gates", "an utterance without audio: the speech and cross-modal experts get "
       "no gate weight", FINITE)
def _(env):
    import torch

    model = env.model("emb")[0]
    inputs = _with(E, speech_mask=torch.tensor([[1, 0, 1]]))

    def check(result):
        outputs = result[1]
        problem = output_problem(outputs)
        if problem:
            return problem
        names = model.expert_names
        weights = dict(zip(names, outputs.gate_weights[0, 1].tolist()))
        wrong = {n: w for n, w in weights.items() if n != "text" and w > 1e-4}
        return f"gate weights of the audio-less utterance {weights}" if wrong else None

    def act():
        with torch.no_grad():
            return inputs, model(**inputs)

    return Trial(act, check)


# ==================================================================================================== pipeline
def _pipeline(env, kind="text", **overrides):
    def make():
        from transformers import pipeline

        model, processor = env.model(kind, **overrides)
        return pipeline("conversational-emotion-recognition", model=model, processor=processor)

    return env.once(("pipeline", kind, tuple(sorted(overrides.items()))), make)


def prediction_problem(item: dict, experts: list[str]) -> str | None:
    """None when one utterance's prediction is right: a label of the model's set, scores summing to 1 with the
    label's the highest, gate weights over the model's experts summing to 1."""
    if not isinstance(item, dict) or item.get("label") not in LABELS:
        return f"prediction {item!r:.120} has no label of {LABELS}"
    scores = item.get("scores", {})
    if sorted(scores) != sorted(LABELS) or not all(math.isfinite(v) for v in scores.values()):
        return f"scores {scores}"
    if abs(sum(scores.values()) - 1) > 1e-3 or abs(item["score"] - max(scores.values())) > 1e-6:
        return f"scores sum to {sum(scores.values()):.4f}, score {item['score']}"
    gates = item.get("gate_weights", {})
    values = [v for v in gates.values()] if isinstance(gates, dict) else []
    if sorted(gates) != sorted(experts) or not all(math.isfinite(v) for v in values) or abs(sum(values) - 1) > 1e-3:
        return f"gate weights {gates}"
    return None


def pipeline_check(lengths: list[int] | None, single: bool, experts=None, reference=None):
    """check(result) of a pipeline call: one list of predictions per conversation (just the list for a single
    conversation), every prediction right; `reference()` gives the expected result to compare scores with."""
    def check(result):
        conversations = [result] if single else result
        if not isinstance(conversations, list) or (lengths is not None and [
                len(c) if isinstance(c, list) else None for c in conversations] != lengths):
            return f"result {summarize(result)}, expected conversations of {lengths} utterances"
        for conversation in conversations:
            for item in conversation:
                problem = prediction_problem(item, experts or ["speech", "text", "cross-modal"])
                if problem:
                    return problem
        if reference is not None:
            expected = reference()
            expected = [expected] if single else expected
            for got_conversation, want_conversation in zip(conversations, expected):
                for got, want in zip(got_conversation, want_conversation):
                    gap = max(abs(got["scores"][k] - want["scores"][k]) for k in LABELS)
                    if gap > 1e-4:
                        return f"scores differ from the reference by {gap:.3g}"
        return None

    return check


def _pipe_call(conversations, kind="text", check=None, **kwargs):
    def build(env):
        recognizer = _pipeline(env, kind)
        value = conversations(env) if callable(conversations) else conversations
        return Trial(lambda: recognizer(value, **kwargs), check)

    return build


_ONE = [{"text": "hello there how are you"}, {"text": "oh no really"}]
_TWO = [_ONE, [{"text": "what a day"}]]

probe("pipeline", "valid-conversation", "one conversation of two utterances", FINITE)(
    _pipe_call(_ONE, check=pipeline_check([2], single=True, experts=["text"])))
probe("pipeline", "batch-size-independent", "two conversations with batch_size=2 give the results of batch_size=1",
      FINITE)(lambda env: Trial(lambda: _pipeline(env)(_TWO, batch_size=2), pipeline_check(
          [2, 1], single=False, experts=["text"], reference=lambda: _pipeline(env)(_TWO, batch_size=1))))
for _name, _value, _what in (
    ("string", "hello there", "a string"), ("none", None, "None"),
    ("dict", {"text": "hello there"}, "one utterance dict"),
    ("utterance-none", [{"text": "hello"}, None], "a conversation holding None"),
    ("empty-conversation-in-batch", [[{"text": "hello"}], []], "a batch holding an empty conversation"),
    ("text-empty", [{"text": ""}], "a text-only model and an utterance with text ''"),
):
    probe("pipeline", _name, f"pipeline given {_what}", NAMED)(_pipe_call(_value))
probe("pipeline", "empty-list", "pipeline([]): an empty result, or refused", EITHER)(
    _pipe_call([], check=lambda result: None if result == [] else f"returned {summarize(result)}"))
for _name, _size in (("batch-size-minus-one", -1), ("batch-size-zero", 0), ("batch-size-string", "2")):
    probe("pipeline", _name, f"pipeline(conversations, batch_size={_size!r})", NAMED)(
        _pipe_call(_TWO, batch_size=_size, check=lambda result: f"returned {summarize(result)}"))
probe("pipeline", "unknown-keyword", "pipeline(conversation, temperature=0.5): an argument it does not take", NAMED)(
    _pipe_call(_ONE, temperature=0.5))
probe("pipeline", "asr-model-typo", "pipeline(conversation, asr_modle='x'): a mistyped option", NAMED)(
    _pipe_call(_ONE, asr_modle="openai/whisper-tiny.en"))


@probe("pipeline", "blank-text-with-audio", "speech+text model, an utterance with audio and text '': its prediction "
       "is the audio-only one", FINITE)
def _(env):
    model, processor = env.model("av")
    conversation = [{"text": "hello there", "audio": audio(seed=30), "sampling_rate": RATE},
                    {"text": "", "audio": audio(seed=31), "sampling_rate": RATE}]

    def check(result):
        problem = pipeline_check([2], single=True)(result)
        if problem:
            return problem
        expected = absent_text_reference(model, processor, conversation, [1]).logits[0].exp()
        gap = max(abs(result[t]["scores"][label] - float(expected[t, i])) for t in range(2)
                  for i, label in enumerate(LABELS))
        return None if gap <= 1e-4 else f"scores differ from the audio-only ones by {gap:.3g}"

    return Trial(lambda: _pipeline(env, "av")(conversation), check)


probe("pipeline", "missing-audio-file", "speech+text model, an utterance whose audio path does not exist", NAMED)(
    _pipe_call([{"text": "hello", "audio": "/nonexistent/turn.wav"}], kind="av"))


# =================================================================================================== streaming
def _recognizer(env, kind="av", normalize=True):
    from mister_e_hf import StreamingEmotionRecognizer

    model, processor = env.model(kind, causal=True, normalize=normalize)
    return StreamingEmotionRecognizer(model, processor)


def streaming_problem(prediction, turn: int, experts=("speech", "text", "cross-modal")) -> str | None:
    item = {"label": getattr(prediction, "label", None), "score": getattr(prediction, "score", None),
            "scores": getattr(prediction, "scores", {}), "gate_weights": getattr(prediction, "gate_weights", {})}
    problem = prediction_problem(item, list(experts))
    if problem is None and prediction.turn != turn:
        problem = f"turn {prediction.turn}, expected {turn}"
    return problem


def _push(utterance, kind="av", check=None, normalize=True):
    def build(env):
        recognizer = _recognizer(env, kind, normalize)
        value = utterance(env) if callable(utterance) else utterance
        experts = ["text"] if kind == "text" else ["speech", "text", "cross-modal"]
        return Trial(lambda: recognizer.push(value), check or (lambda p: streaming_problem(p, 0, experts)))

    return build


probe("streaming", "valid-utterance", "push one utterance with audio and text", FINITE)(
    _push({"text": "hello there", "audio": audio(seed=40), "sampling_rate": RATE}))
for _name, _value, _what, _kind in (
    ("string", "hello there", "a string", "text"), ("none", None, "None", "text"),
    ("text-empty", {"text": ""}, "{'text': ''} to a text-only model", "text"),
    ("audio-10-samples", {"text": "hi", "audio": audio(10), "sampling_rate": RATE}, "10 samples of audio", "av"),
    ("audio-nan", {"text": "hi", "audio": np.full(8000, float("nan"), "float32"),
                   "sampling_rate": RATE}, "NaN audio", "av"),
    ("rate-1", {"text": "hi", "audio": audio(3), "sampling_rate": 1}, "3 samples at `sampling_rate=1` (3 s once "
                                                                      "resampled)", "av"),
):
    probe("streaming", _name, f"push {_what}", NAMED)(_push(_value, kind=_kind))


@probe("streaming", "int16-audio", "push int16 PCM: the same prediction as the float samples soundfile would give",
       FINITE)
def _(env):
    pcm = _pcm("int16")

    def check(prediction):
        problem = streaming_problem(prediction, 0)
        if problem:
            return problem
        fresh = _recognizer(env, normalize=False)
        reference = fresh.push({"text": "hello", "audio": pcm.astype("float32") / 32768, "sampling_rate": RATE})
        gap = max(abs(prediction.scores[k] - reference.scores[k]) for k in LABELS)
        return None if gap <= 1e-4 else f"scores differ from the scaled audio's by {gap:.3g}"

    recognizer = _recognizer(env, normalize=False)
    return Trial(lambda: recognizer.push({"text": "hello", "audio": pcm, "sampling_rate": RATE}), check)


def _offline_causal(env, conversation, absent=()):
    model, processor = env.model("av", causal=True)
    if absent:
        return absent_text_reference(model, processor, conversation, list(absent)).logits[0].exp()
    return forward(model, processor, [conversation])[1].logits[0].exp()


def _streamed_equals_offline(conversation, absent=()):
    def build(env):
        recognizer = _recognizer(env)

        def act():
            return [recognizer.push(u) for u in conversation]

        def check(predictions):
            for turn, prediction in enumerate(predictions):
                problem = streaming_problem(prediction, turn)
                if problem:
                    return problem
            expected = _offline_causal(env, conversation, absent)
            gap = max(abs(p.scores[k] - float(expected[t, i])) for t, p in enumerate(predictions)
                      for i, k in enumerate(LABELS))
            return None if gap <= 1e-4 else f"streamed scores differ from the offline causal model's by {gap:.3g}"

        return Trial(act, check)

    return build


_LIVE = [{"text": "hello there", "audio": audio(seed=41), "sampling_rate": RATE},
         {"text": "oh no really", "audio": audio(7000, seed=42), "sampling_rate": RATE},
         {"text": "okay"}]
probe("streaming", "equals-offline", "three pushes equal the offline causal model on the whole conversation",
      FINITE)(_streamed_equals_offline(_LIVE))
probe("streaming", "blank-text-with-audio", "pushing an utterance with audio and text '' gives its audio-only "
      "prediction (equal to the offline causal model with that text absent)", FINITE)(
    _streamed_equals_offline([_LIVE[0], {"text": "", "audio": audio(seed=43), "sampling_rate": RATE}], absent=[1]))


@probe("streaming", "recovers-after-error", "a refused push (NaN audio) leaves the conversation unchanged: the next "
       "push is turn 0 with a fresh recognizer's prediction", FINITE)
def _(env):
    import numpy as np

    recognizer = _recognizer(env)
    good = {"text": "hello there", "audio": audio(seed=44), "sampling_rate": RATE}

    def act():
        try:
            recognizer.push({"text": "hi", "audio": np.full(8000, np.nan, np.float32), "sampling_rate": RATE})
            first = None
        except Exception as error:  # noqa: BLE001
            first = error
        return first, recognizer.push(good)

    def check(result):
        first, prediction = result
        if first is None:
            return "the NaN push was accepted"
        outcome, finding = classify_exception(first)
        if outcome != NAMED:
            return f"the NaN push gave an {outcome}: {finding}"
        reference = _recognizer(env).push(good)
        problem = streaming_problem(prediction, 0)
        gap = max(abs(prediction.scores[k] - reference.scores[k]) for k in LABELS)
        return problem or (None if gap <= 1e-4 else f"the next prediction differs from a fresh one by {gap:.3g}")

    return Trial(act, check)


@probe("streaming", "bidirectional-model", "StreamingEmotionRecognizer on a bidirectional model", NAMED)
def _(env):
    from mister_e_hf import StreamingEmotionRecognizer

    model, processor = env.model("av")
    return Trial(lambda: StreamingEmotionRecognizer(model, processor))


# ===================================================================================================== loaders
HEADER = "conversation_id,turn,text,label\n"


def _write(env, name: str, content, encoding: str = "utf-8", folder=None) -> Path:
    folder = folder or env.fresh_folder("manifest")
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def _json_lines(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def corpus_summary(result, split="train") -> dict:
    datasets, report = result
    dataset = datasets[split]
    return {"labels": dataset.features["labels"].feature.names,
            "rows": {row["conversation_id"]: {"turns": row["turns"], "texts": row["texts"], "labels": row["labels"],
                                              "audio": row["audio"]} for row in dataset},
            "report": json.dumps(report.to_dict())}


def corpus_check(labels=None, rows=None, report_has=(), split="train"):
    """check(result) of a loader: the label set, and per conversation the given fields (turns, texts, labels),
    and words the data report must mention."""
    def check(result):
        summary = corpus_summary(result, split)
        if labels is not None and summary["labels"] != labels:
            return f"label set {summary['labels']}, expected {labels}"
        for conversation, fields in (rows or {}).items():
            got = summary["rows"].get(conversation)
            if got is None:
                return f"conversation {conversation!r} missing; got {sorted(summary['rows'])}"
            for key, want in fields.items():
                if got[key] != want:
                    return f"conversation {conversation!r}: {key} {got[key]}, expected {want}"
        for needle in report_has:
            if needle not in summary["report"]:
                return f"the data report does not mention {needle!r}: {summary['report'][:200]}"
        return None

    return check


def _manifest(content, name="train.csv", encoding="utf-8", check=None, **options):
    def build(env):
        from mister_e_hf.data import load_corpus

        text = content(env) if callable(content) else content
        path = _write(env, name, text, encoding)
        return Trial(lambda: load_corpus("manifest", train_file=str(path), **options), check)

    return build


def _labels_finding(result):
    summary = corpus_summary(result)
    return f"loaded: label set {summary['labels']}, rows {json.dumps(summary['rows'])[:160]}"


_CSV = HEADER + "a,0,hello there,happy\na,1,\"oh, no\",calm\nb,0,fine thanks,calm\n"
probe("loaders", "csv-valid", "a CSV manifest with a quoted comma", FINITE)(_manifest(_CSV, check=corpus_check(
    ["calm", "happy"], {"a": {"turns": [0, 1], "texts": ["hello there", "oh, no"], "labels": [1, 0]}})))
probe("loaders", "csv-unquoted-comma", "a CSV row `a,1,oh, no,calm` (unquoted comma: 5 fields under a 4-column "
      "header)", NAMED)(_manifest(HEADER + "a,0,hello there,happy\na,1,oh, no,calm\n", check=_labels_finding))
probe("loaders", "csv-short-row", "a CSV row with 3 fields under a 4-column header", NAMED)(
    _manifest(HEADER + "a,0,hello there,happy\na,1,oh no\n", check=_labels_finding))
probe("loaders", "csv-extra-field-first-row", "the first CSV row with 5 fields", NAMED)(
    _manifest(HEADER + "a,0,hello,there,happy\na,1,oh no,calm\n", check=_labels_finding))
probe("loaders", "csv-bom", "a CSV saved with a UTF-8 byte-order mark (Excel's 'CSV UTF-8')", FINITE)(
    _manifest(_CSV, encoding="utf-8-sig", check=corpus_check(["calm", "happy"], {"a": {"turns": [0, 1]}})))
probe("loaders", "csv-latin1", "a CSV in Latin-1 (not UTF-8: 'café' as byte 0xE9)", NAMED)(
    _manifest(HEADER + "a,0,un café,happy\na,1,oh no,calm\n", encoding="latin-1"))
probe("loaders", "csv-missing-label-column", "a CSV without a `label` column", NAMED)(
    _manifest("conversation_id,turn,text\na,0,hello\n"))
probe("loaders", "csv-blank-and-whitespace-text", "rows with text '' and '   ': absent text (None), like a missing "
      "transcript", FINITE)(_manifest(HEADER + "a,0,,calm\na,1,   ,happy\na,2,hello,calm\n",
                                      check=corpus_check(rows={"a": {"texts": [None, None, "hello"]}})))
probe("loaders", "csv-duplicate-turn", "a conversation with turn 1 twice", NAMED)(
    _manifest(HEADER + "a,0,hi,calm\na,1,oh,calm\na,1,again,happy\n"))
probe("loaders", "csv-duplicate-turn-skip-invalid", "turn 1 twice with skip_invalid=True: the second left out and "
      "reported", FINITE)(_manifest(HEADER + "a,0,hi,calm\na,1,oh,calm\na,1,again,happy\n", skip_invalid=True,
                                    check=corpus_check(rows={"a": {"turns": [0, 1], "texts": ["hi", "oh"]}},
                                                       report_has=("duplicate",))))
probe("loaders", "csv-turn-gaps", "a conversation with turns 0, 2, 5 (utterances filtered out upstream): loaded in "
      "order, the gaps recorded in the data report", FINITE)(
    _manifest(HEADER + "s1,5,last,calm\ns1,0,first,happy\ns1,2,middle,calm\nb,0,alone,calm\n",
              check=corpus_check(rows={"s1": {"turns": [0, 2, 5], "texts": ["first", "middle", "last"]}},
                                 report_has=("s1",))))
probe("loaders", "csv-turns-unordered", "rows of a conversation given out of order (turns 2, 0, 1): ordered by turn",
      FINITE)(_manifest(HEADER + "a,2,c,calm\na,0,a,happy\na,1,b,calm\n",
                        check=corpus_check(rows={"a": {"turns": [0, 1, 2], "texts": ["a", "b", "c"]}})))
probe("loaders", "csv-label-not-in-label-names", "a label outside the `label_names` given", NAMED)(
    _manifest(_CSV, label_names=["happy", "sad"]))
probe("loaders", "csv-missing-audio-file", "a row whose audio file does not exist", NAMED)(
    _manifest("conversation_id,turn,text,label,audio\na,0,hi,calm,gone.wav\n"))
probe("loaders", "csv-missing-audio-skip-invalid", "a missing audio file with skip_invalid=True: left out and "
      "reported", FINITE)(lambda env: _manifest(
          f"conversation_id,turn,text,label,audio\na,0,hi,calm,gone.wav\na,1,oh,happy,{env.wav('plain')}\n",
          skip_invalid=True, check=corpus_check(rows={"a": {"turns": [1]}}, report_has=("not found",)))(env))
probe("loaders", "csv-mistyped-option", "load_corpus('manifest', ..., skip_invalids=True): a mistyped option", NAMED)(
    _manifest(_CSV, skip_invalids=True, check=lambda result: "the mistyped option was ignored"))
probe("loaders", "manifest-tsv", "a manifest named train.tsv", NAMED)(_manifest(_CSV.replace(",", "\t"),
                                                                              name="train.tsv"))
_ROW = {"conversation_id": "a", "turn": 0, "text": "hello there", "label": "happy"}
probe("loaders", "jsonl-valid", "a JSONL manifest", FINITE)(_manifest(
    _json_lines(_ROW, dict(_ROW, turn=1, text="oh no", label="calm")), name="train.jsonl",
    check=corpus_check(["calm", "happy"], {"a": {"turns": [0, 1], "texts": ["hello there", "oh no"]}})))
probe("loaders", "jsonl-list-line", "a JSONL line that is a list", NAMED)(
    _manifest(_json_lines(_ROW, ["a", 1, "oh no", "calm"]), name="train.jsonl"))
probe("loaders", "jsonl-scalar-line", "a JSONL line that is a number", NAMED)(
    _manifest(_json_lines(_ROW, "42"), name="train.jsonl"))
probe("loaders", "jsonl-later-row-missing-turn", "a JSONL row after the first without `turn`", NAMED)(
    _manifest(_json_lines(_ROW, {"conversation_id": "a", "text": "oh", "label": "calm"}), name="train.jsonl"))
probe("loaders", "jsonl-later-row-missing-label", "a JSONL row after the first without `label`", NAMED)(
    _manifest(_json_lines(_ROW, {"conversation_id": "a", "turn": 1, "text": "oh"}), name="train.jsonl",
              check=_labels_finding))
probe("loaders", "jsonl-turn-bool", "a JSONL turn `true`", NAMED)(
    _manifest(_json_lines(_ROW, dict(_ROW, turn=True, label="calm")), name="train.jsonl",
              check=lambda result: f"turn true loaded as {corpus_summary(result)['rows']['a']['turns']}"))
# MELD ----------------------------------------------------------------------------------------------------------
MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode"]


def _meld(env, rows=None, header=MELD_HEADER, encoding="utf-8", splits=("train", "dev", "test")) -> Path:
    import csv

    folder = env.fresh_folder("meld")
    rows = rows or [["1", "Oh my God!", "Ross", "surprise", "positive", "0", "0", "1", "1"],
                    ["2", "Why, what happened?", "Rachel", "neutral", "neutral", "0", "1", "1", "1"],
                    ["3", "I am so sorry.", "Monica", "sadness", "negative", "1", "0", "1", "2"]]
    for split in splits:
        with open(folder / f"{split}_sent_emo.csv", "w", encoding=encoding, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return folder


def _meld_probe(check=None, **meld_kwargs):
    options = meld_kwargs.pop("options", {})

    def build(env):
        from mister_e_hf.data import load_corpus

        folder = _meld(env, **meld_kwargs)
        return Trial(lambda: load_corpus("meld", data_dir=str(folder), **options), check)

    return build


probe("loaders", "meld-valid", "a MELD folder (train/dev/test CSVs)", FINITE)(_meld_probe(check=corpus_check(
    ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"],
    {"train-dia0": {"turns": [0, 1], "texts": ["Oh my God!", "Why, what happened?"]}})))
probe("loaders", "meld-missing-column", "MELD CSVs without the `Sentiment` column", NAMED)(
    _meld_probe(header=[h for h in MELD_HEADER if h != "Sentiment"],
                rows=[["1", "Oh my God!", "Ross", "surprise", "0", "0", "1", "1"]]))
probe("loaders", "meld-non-integer-dialogue", "a MELD row whose Dialogue_ID is 'abc'", NAMED)(
    _meld_probe(rows=[["1", "Oh my God!", "Ross", "surprise", "positive", "abc", "0", "1", "1"]]))
probe("loaders", "meld-mistyped-option", "load_corpus('meld', ..., audio_folder=...): a mistyped option", NAMED)(
    _meld_probe(options={"audio_folder": "clips"}, check=lambda result: "the mistyped option was ignored"))
probe("loaders", "meld-latin1", "MELD CSVs in Latin-1 ('café' as byte 0xE9)", NAMED)(
    _meld_probe(encoding="latin-1", rows=[["1", "Un café!", "Ross", "surprise", "positive", "0", "0", "1", "1"]]))


# EmoDB ---------------------------------------------------------------------------------------------------------
def _emodb(env, speakers=10, header="file,speaker,sentence_code,emotion,transcript", encoding="utf-8",
           wav_dir=True, absent_wav=False, duplicate=False) -> Path:
    folder = env.fresh_folder("emodb")
    lines = [header]
    emotions = ["anger", "neutral"]
    for s in range(speakers):
        for e, emotion in enumerate(emotions):
            name = f"{10 + s:02d}a0{e}{emotion[0].upper()}a.wav"
            lines.append(f"{name},{10 + s},a0{e},{emotion},Der Lappen liegt auf dem Eisschrank.")
            if wav_dir and not (absent_wav and s == 0 and e == 0):
                (folder / "wav").mkdir(exist_ok=True)
                shutil.copyfile(env.wav("emodb-clip", seconds=0.1), folder / "wav" / name)
    if duplicate:
        lines.append(lines[1])
    (folder / "metadata.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return folder


def _emodb_probe(check=None, options=None, **emodb_kwargs):
    def build(env):
        from mister_e_hf.data import load_corpus

        folder = _emodb(env, **emodb_kwargs)
        return Trial(lambda: load_corpus("emodb", data_dir=str(folder), **(options or {})), check)

    return build


def _emodb_split_check(result):
    datasets, _ = result
    sizes = {split: len(datasets[split]) for split in datasets}
    speakers = {split: sorted(set(s for row in datasets[split]["speaker"] for s in row)) for split in datasets}
    if sizes != {"train": 12, "validation": 4, "test": 4}:
        return f"split sizes {sizes}"
    if speakers["test"] != ["10", "11"] or speakers["validation"] != ["12", "13"]:
        return f"speakers by split {speakers}"
    return corpus_check(["anger", "neutral"])(result)


probe("loaders", "emodb-valid", "an EmoDB folder of 10 speakers, fold 0", FINITE)(_emodb_probe(_emodb_split_check))
probe("loaders", "emodb-bom", "EmoDB metadata.csv with a UTF-8 byte-order mark", FINITE)(
    _emodb_probe(_emodb_split_check, encoding="utf-8-sig"))
probe("loaders", "emodb-fold-out-of-range", "EmoDB fold 7 of 5", NAMED)(_emodb_probe(options={"fold": 7}))
probe("loaders", "emodb-listed-wav-absent", "a metadata row whose wav file is absent", NAMED)(
    _emodb_probe(absent_wav=True))
probe("loaders", "emodb-mistyped-option", "load_corpus('emodb', ..., folds=3): a mistyped option", NAMED)(
    _emodb_probe(options={"folds": 3}, check=lambda result: "the mistyped option was ignored"))


# ======================================================================================================= cache
def _tiny_corpus(env) -> Path:
    """A manifest corpus (JSONL + WAV files), train / validation / test, labels from LABELS."""
    def make():
        import numpy as np
        import soundfile

        folder = env.path("corpus", "x").parent
        rng = np.random.default_rng(0)
        for split, count in (("train", 4), ("validation", 2), ("test", 2)):
            lines = []
            for c in range(count):
                for turn in range(2):
                    label = LABELS[(c + turn) % 4]
                    name = f"{split}-{c}-{turn}.wav"
                    soundfile.write(folder / name, (0.1 * rng.standard_normal(4000)).astype(np.float32), RATE)
                    lines.append({"conversation_id": f"{split}{c}", "turn": turn, "text": words(3, seed=c + turn),
                                  "audio": name, "label": label})
            (folder / f"{split}.jsonl").write_text(_json_lines(*lines))
        return folder

    return env.once("tiny-corpus", make)


def _cache_setup(env):
    """(model with frozen tiny backbones, processor, datasets, clean cache folder, the clean datasets with cached
    embeddings)."""
    def make():
        from mister_e_hf import MisterEModel, MisterEProcessor
        from mister_e_hf.cache import add_cached_embeddings
        from mister_e_hf.data import load_corpus

        folders = env.backbones()
        model = MisterEModel.from_backbones(str(folders["speech"]), str(folders["text"]), freeze_speech_backbone=True,
                                            freeze_text_backbone=True, id2label=dict(enumerate(LABELS)),
                                            **TINY_HEAD).eval()
        processor = MisterEProcessor.from_backbones(str(folders["speech"]), str(folders["text"]))
        datasets, _ = load_corpus("manifest", data_dir=str(_tiny_corpus(env)))
        clean = env.path("cache", "clean", "x").parent
        cached, _ = add_cached_embeddings(model, processor, datasets, cache_dir=str(clean))
        return model, processor, datasets, clean, cached

    return env.once("cache-setup", make)


def _first_vector_offset(shard_file: Path, shard_folder: Path) -> int | None:
    """Byte offset of the first embedding value of a shard in its Arrow file (found by its bytes), or None."""
    import numpy as np
    from datasets import load_from_disk

    first = np.asarray(load_from_disk(str(shard_folder))[0]["embedding"], dtype=np.float32).reshape(-1)
    offset = shard_file.read_bytes().find(first[:3].tobytes())
    return offset if offset >= 0 else None


def _corrupt(folder: Path, how: str) -> str:
    """Corrupts the speech entry's first shard in `folder` in place; returns what was done."""
    import struct

    shards = sorted(p for p in folder.glob("speech-*/shard-*") if p.is_dir())
    if not shards:
        raise HarnessError(f"no speech shard under {folder}")
    arrows = sorted(shards[0].rglob("*.arrow"))
    if not arrows:
        raise HarnessError(f"no .arrow file in {shards[0]}")
    arrow = arrows[0]
    if how == "truncate":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        return f"truncated {arrow.name} to half"
    if how == "delete":
        arrow.unlink()
        return f"deleted {arrow.name}"
    if how == "metadata":
        for name in ("dataset_info.json", "state.json"):
            if (shards[0] / name).exists():
                (shards[0] / name).write_text("{ not json")
        return "overwrote the shard's dataset_info.json and state.json with invalid JSON"
    offset = _first_vector_offset(arrow, shards[0])
    data = bytearray(arrow.read_bytes())
    where = offset if offset is not None else (len(data) // 2) // 4 * 4
    if how == "flip":
        data[where + 3] ^= 0x01  # an exponent bit: a finite value, 4x larger or smaller
    else:
        data[where : where + 4] = struct.pack("<f", float("nan") if how == "nan" else float("inf"))
    arrow.write_bytes(bytes(data))
    return f"{how} at byte {where} of {arrow.name}" + ("" if offset is not None else " (value not located)")


def _cache_probe(how: str | None):
    def build(env):
        from mister_e_hf.cache import add_cached_embeddings

        model, processor, datasets, clean, reference = _cache_setup(env)
        folder = env.fresh_folder("cache-copy")
        shutil.rmtree(folder)
        shutil.copytree(clean, folder)
        done = _corrupt(folder, how) if how else "untouched"

        def check(result):
            (cached, stats), messages = result
            for split in reference:
                for column in ("speech_embeds", "text_embeds"):
                    problem = close_problem(cached[split][column], reference[split][column],
                                            f"{split} {column} ({done})", atol=1e-6)
                    if problem:
                        return problem
            if how is None and stats.utterances_embedded:
                return f"a second run extracted {stats.utterances_embedded} utterances again"
            if how is not None and not warned(messages, "shard"):
                return f"right embeddings, but the bad shard was not reported ({done})"
            return None

        return Trial(lambda: with_logs(lambda: add_cached_embeddings(model, processor, datasets,
                                                                     cache_dir=str(folder))), check)

    return build


probe("cache", "second-run", "a second run on the same corpus reads every embedding from the cache", FINITE)(
    _cache_probe(None))
for _how, _what in (("flip", "a flipped bit in a stored embedding value (finite, wrong)"),
                    ("nan", "a NaN written over a stored embedding value"),
                    ("inf", "an infinity written over a stored embedding value"),
                    ("truncate", "a shard's .arrow file truncated to half"),
                    ("delete", "a shard's .arrow file deleted"),
                    ("metadata", "a shard's dataset_info.json / state.json overwritten with invalid JSON")):
    probe("cache", f"shard-{_how}", f"{_what}: the shard is reported by path and re-extracted (the same embeddings as "
          "a clean cache), or refused with a named error", EITHER)(_cache_probe(_how))


@probe("cache", "cache-dir-is-a-file", "`cache_dir` pointing at an existing file", NAMED)
def _(env):
    from mister_e_hf.cache import add_cached_embeddings

    model, processor, datasets, _, _ = _cache_setup(env)
    path = env.text_file("cache-is-a-file", b"x")
    return Trial(lambda: add_cached_embeddings(model, processor, datasets, cache_dir=str(path)))


@probe("cache", "nan-wav-in-corpus", "a corpus WAV holding a NaN sample, at extraction: refused naming that file",
       NAMED)
def _(env):
    from datasets import DatasetDict

    from mister_e_hf.cache import add_cached_embeddings

    model, processor, datasets, _, _ = _cache_setup(env)
    bad = env.wav("corpus-nan", subtype="FLOAT", nan=True)
    train = datasets["train"]
    audio_column = [list(paths) for paths in train["audio"]]
    audio_column[2][1] = str(bad)
    changed = DatasetDict({"train": train.remove_columns("audio").add_column("audio", audio_column)})
    folder = env.fresh_folder("cache-nan-wav")
    return Trial(lambda: add_cached_embeddings(model, processor, changed, cache_dir=str(folder)),
                 locate=[bad.name])


@probe("cache", "unfrozen-backbone", "caching embeddings of a backbone that is not frozen", NAMED)
def _(env):
    from mister_e_hf.cache import add_cached_embeddings

    _, _, datasets, _, _ = _cache_setup(env)
    model, processor = env.model("av")
    return Trial(lambda: add_cached_embeddings(model, processor, datasets, cache_dir=str(env.fresh_folder("c"))))


# ========================================================================================================= CLI
def saved_model(env, kind: str = "text") -> Path:
    """A tiny model of `kind` saved with its processor (`save_pretrained`), as `mister-e --model` takes it."""
    def make():
        model, processor = env.build(kind)
        folder = env.path("models", kind, "x").parent
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    return env.once(("saved", kind), make)


def damaged_model(env, how: str) -> Path:
    """A copy of the saved text model: `nan` (one weight NaN), `bin-only` (weights as pytorch_model.bin only),
    `truncated` (model.safetensors cut in half), `bad-config` (config.json not JSON)."""
    def make():
        import torch
        from safetensors.torch import load_file, save_file

        folder = env.path("models", f"text-{how}", "x").parent
        shutil.rmtree(folder)
        shutil.copytree(saved_model(env), folder)
        weights = folder / "model.safetensors"
        if how == "nan":
            tensors = load_file(weights)
            name = next(n for n in sorted(tensors) if "fusion" in n and tensors[n].is_floating_point())
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = float("nan")
            save_file(tensors, weights, metadata={"format": "pt"})
        elif how == "bin-only":
            torch.save(load_file(weights), folder / "pytorch_model.bin")
            weights.unlink()
        elif how == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif how == "bad-config":
            (folder / "config.json").write_text("{ this is not json")
        return folder

    return env.once(("damaged", how), make)


def conversations_file(env, name: str, content) -> Path:
    path = env.path("cli-inputs", name)
    path.write_text(content(env) if callable(content) else content)
    return path


def run_cli(argv: list[str]) -> CliRun:
    """`mister-e argv` in-process: exit status, the output, and the exception behind a one-line error (the
    command's own function is wrapped to record it)."""
    import transformers

    from mister_e_hf import cli

    causes = []

    def wrap(run):
        def wrapped(args):
            try:
                return run(args)
            except BaseException as error:
                causes.append(error)
                raise

        return wrapped

    build_parser = cli.build_parser

    def patched_parser():
        parser = build_parser()
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for sub in getattr(action, "choices", {}).values():
                if sub.get_default("run") is not None:
                    sub.set_defaults(run=wrap(sub.get_default("run")))
        return parser

    verbosity = transformers.utils.logging.get_verbosity()
    out, err = io.StringIO(), io.StringIO()
    cli.build_parser = patched_parser
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
            except Exception:  # escaped the CLI: the user sees this traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        cli.build_parser = build_parser
        transformers.utils.logging.set_verbosity(verbosity)
    return CliRun(int(code or 0), out.getvalue(), err.getvalue(), causes[-1] if causes else None)


def subprocess_env(env) -> dict:
    variables = dict(os.environ, PYTHONPATH=str(env.source_root / "src"), OMP_NUM_THREADS="1",
                     TOKENIZERS_PARALLELISM="false")
    return variables


def run_command(env, command: list[str], timeout: int = 100, folder: Path | None = None) -> CliRun:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_env(env),
                          cwd=str(env.folder))
    return CliRun(done.returncode, done.stdout, done.stderr, folder=folder)


def strict_json_lines(text: str) -> tuple[list[dict] | None, str | None]:
    """The JSON objects of JSONL text, refusing NaN and infinities (not JSON): `(objects, None)` or `(None, why)`."""
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    objects = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                objects.append(json.loads(line, parse_constant=refuse))
            except ValueError as error:
                return None, f"line {number} is not strict JSON ({error}): {line[:100]}"
    return objects, None


def predictions_check(expected_lines: int, from_file: Path | None = None):
    def check(run):
        text = from_file.read_text() if from_file is not None else run.stdout
        objects, problem = strict_json_lines(text)
        if problem:
            return problem
        if len(objects) != expected_lines:
            return f"{len(objects)} prediction lines, expected {expected_lines}"
        for item in objects:
            problem = prediction_problem(item, ["text"]) if "conversation_id" in item else "no conversation_id"
            if problem:
                return problem
        return None

    return check


_JSONL = _json_lines([{"text": "hello there"}, {"text": "oh no really"}], [{"text": "what a day"}])


def _predict(make_argv, check=None):
    def build(env):
        argv = make_argv(env)
        return Trial(lambda: run_cli(argv), check, kind="cli")

    return build


def _argv(model="text", content=_JSONL, name="conversations.jsonl", *extra):
    def make(env):
        folder = saved_model(env, model) if model in ("text", "av") else (
            damaged_model(env, model) if model else env.folder / "no-model-here")
        return ["predict", "--model", str(folder), str(conversations_file(env, name, content)), *extra]

    return make


probe("cli", "predict-valid", "mister-e predict on two conversations: strict JSONL, one line per utterance", FINITE)(
    _predict(_argv(), predictions_check(3)))
probe("cli", "predict-missing-input", "mister-e predict on a file that does not exist", NAMED)(
    _predict(lambda env: ["predict", "--model", str(saved_model(env)), str(env.folder / "absent.jsonl")]))
probe("cli", "predict-empty-file", "mister-e predict on an empty file", NAMED)(_predict(_argv(content="")))
probe("cli", "predict-blank-text", "mister-e predict, a text model and an utterance with text ''", NAMED)(
    _predict(_argv(content=_json_lines([{"text": "hello"}, {"text": ""}]))))
probe("cli", "predict-truncated-wav", "mister-e predict, an utterance whose WAV is cut inside its data", NAMED)(
    _predict(_argv("av", lambda env: _json_lines([{"text": "hello", "audio": str(env.truncated_wav())}]))))
for _size in ("-1", "0"):
    probe("cli", f"predict-batch-size-{_size.replace('-', 'minus-')}", f"mister-e predict --batch_size {_size}",
          NAMED)(_predict((lambda size: lambda env: _argv()(env) + ["--batch_size", size])(_size),
                          lambda run: f"exit 0 with {len(run.stdout.splitlines())} output lines"))
probe("cli", "predict-bin-only-model", "mister-e predict on a model folder holding only pytorch_model.bin (a pickle; "
      "the toolkit is safetensors-only)", NAMED)(_predict(_argv(model="bin-only"),
                                                          lambda run: "loaded pickled weights"))
probe("cli", "predict-nan-model", "mister-e predict with a model holding a NaN weight: must not print NaN "
      "(invalid JSON) or meaningless scores", NAMED)(_predict(_argv(model="nan"), predictions_check(3)))
probe("cli", "predict-truncated-weights", "mister-e predict with model.safetensors cut in half", NAMED)(
    _predict(_argv(model="truncated")))
probe("cli", "predict-bad-config", "mister-e predict with a config.json that is not JSON", NAMED)(
    _predict(_argv(model="bad-config")))


def _evaluate_corpus(env) -> Path:
    rows = [{"conversation_id": f"c{i}", "turn": t, "text": words(3, seed=i + t), "label": LABELS[(i + t) % 4]}
            for i in range(3) for t in range(2)]
    folder = env.fresh_folder("evaluate")
    (folder / "test.jsonl").write_text(_json_lines(*rows))
    return folder


probe("cli", "evaluate-valid", "mister-e evaluate on a manifest test split: strict JSON metrics", FINITE)(
    _predict(lambda env: ["evaluate", "--model", str(saved_model(env)), "--dataset", "manifest", "--data_dir",
                          str(_evaluate_corpus(env))],
             lambda run: strict_json_lines(run.stdout.replace("\n", " "))[1]))
probe("cli", "evaluate-batch-size-zero", "mister-e evaluate --batch_size 0", NAMED)(
    _predict(lambda env: ["evaluate", "--model", str(saved_model(env)), "--dataset", "manifest", "--data_dir",
                          str(_evaluate_corpus(env)), "--batch_size", "0"]))


def _cli_subprocess(model: str, check=None):
    def build(env):
        folder = saved_model(env) if model == "text" else damaged_model(env, model)
        inputs = conversations_file(env, "subprocess.jsonl", _JSONL)
        command = [sys.executable, "-m", "mister_e_hf.cli", "predict", "--model", str(folder), str(inputs)]
        return Trial(lambda: run_command(env, command), check, kind="cli")

    return build


probe("cli", "subprocess-predict-valid", "`python -m mister_e_hf.cli predict` as a separate process", FINITE)(
    _cli_subprocess("text", predictions_check(3)))
probe("cli", "subprocess-predict-nan-model", "the same with a NaN weight in the model", NAMED)(
    _cli_subprocess("nan", predictions_check(3)))


# ==================================================================================================== training
def _train_rows(labels_per_row, nan: str | None = None):
    rows = []
    for i, labels in enumerate(labels_per_row):
        row = _cached_row(len(labels), seed=i, nan_at=0 if nan and i == 1 else None,
                          value=float("nan") if nan == "nan" else float("inf"))
        row["labels"] = list(labels)
        rows.append(row)
    return rows


def non_finite_weights(folder: Path) -> str | None:
    """A finding when any safetensors file under `folder` holds a NaN or infinite value."""
    import torch
    from safetensors.torch import load_file

    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            tensors = load_file(path)
        except Exception:  # noqa: BLE001 -- a torn file is a different matter; not judged here
            continue
        bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            return f"{path.relative_to(folder)} holds non-finite weights ({bad[0]}, ...)"
    return None


def _train(labels_per_row, nan=None, expected_finite=False, learning_rate=1e-2, rows=None, **model_overrides):
    def build(env):
        import torch
        from datasets import Dataset
        from transformers import TrainingArguments

        from mister_e_hf.data import DataCollatorForConversations
        from mister_e_hf.trainer import MisterETrainer

        model = env.build("emb", **model_overrides)[0]
        folder = env.fresh_folder("training")
        dataset = Dataset.from_list(rows if rows is not None else _train_rows(labels_per_row, nan))
        arguments = TrainingArguments(output_dir=str(folder), num_train_epochs=2, per_device_train_batch_size=2,
                                      learning_rate=learning_rate, save_strategy="steps", save_steps=1,
                                      eval_strategy="no", logging_strategy="no",
                                      report_to="none", disable_tqdm=True, remove_unused_columns=False, use_cpu=True,
                                      seed=0)
        trainer = MisterETrainer(model=model, args=arguments, train_dataset=dataset,
                                 data_collator=DataCollatorForConversations(None))

        def check(result):
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                return f"training returned with non-finite weights ({bad[0]}, ...)"
            if not math.isfinite(result.training_loss):
                return f"training loss {result.training_loss}"
            return None

        return Trial(trainer.train, check, after=lambda: non_finite_weights(folder))

    return build


probe("training", "valid", "MisterETrainer on cached embeddings of 4 conversations, 2 epochs", FINITE)(
    _train([[0, 1], [2, 3], [1, 0], [3, 2]]))
probe("training", "all-unlabelled", "a training split whose utterances are all unlabelled (-1)", NAMED)(
    _train([[-1, -1], [-1, -1], [-1, -1]]))
probe("training", "single-class", "a training split of one class only", NAMED)(_train([[1, 1], [1, 1], [1, 1]]))
probe("training", "label-out-of-range", "a training label 7 for a model of 4 classes", NAMED)(
    _train([[0, 7], [1, 2], [3, 0]]))
probe("training", "nan-embeddings", "a NaN in the cached embeddings: stopped with a named error, no non-finite "
      "checkpoint written", NAMED)(_train([[0, 1], [2, 3], [1, 0], [3, 2]], nan="nan"))
probe("training", "inf-embeddings", "an infinity in the cached embeddings: the same", NAMED)(
    _train([[0, 1], [2, 3], [1, 0], [3, 2]], nan="inf"))
probe("training", "huge-learning-rate", "learning rate 1e6: trains to finite weights, or stops with a named error "
      "before saving anything non-finite", EITHER)(_train([[0, 1], [2, 3], [1, 0], [3, 2]], learning_rate=1e6))
probe("training", "no-labels-column", "a training split without a `labels` column", NAMED)(
    lambda env: _train(None, rows=[{k: v for k, v in r.items() if k != "labels"}
                                   for r in _train_rows([[0, 1], [2, 3]])])(env))
probe("training", "standardize-one-utterance", "standardize_embeddings fitted on a training split with one "
      "utterance that has audio", NAMED)(
    lambda env: _train(None, rows=[dict(_cached_row(2), speech_present=[1, 0])], standardize_embeddings=True)(env))


def _run_erc_command(env, output: Path, cache: Path, *extra) -> list[str]:
    folders = env.backbones()
    return [sys.executable, str(env.source_root / "examples" / "run_erc.py"), "--dataset", "manifest", "--data_dir",
            str(_tiny_corpus(env)), "--speech_model_name_or_path", str(folders["speech"]),
            "--text_model_name_or_path", str(folders["text"]), "--freeze_backbones", "--output_dir", str(output),
            "--embedding_cache_dir", str(cache), "--config_overrides",
            "projection_dim=16,context_hidden_size=8,expert_hidden_size=16,cross_attention_heads=2",
            "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--seed", "3", "--disable_tqdm",
            "true", "--report_to", "none", *extra]


def run_outputs_problem(output: Path) -> str | None:
    """A finding unless a run_erc output folder holds finite weights and strict-JSON results."""
    if not (output / "model.safetensors").is_file():
        return "no model.safetensors written"
    problem = non_finite_weights(output)
    if problem:
        return problem
    for name in ("all_results.json", "test_results.json"):
        path = output / name
        if not path.is_file():
            return f"no {name} written"
        objects, problem = strict_json_lines(path.read_text().replace("\n", " "))
        if problem:
            return f"{name}: {problem}"
    return None


def _first_run(env):
    """One run_erc training on the tiny corpus (frozen backbones): (its CliRun, output folder, cache folder)."""
    def make():
        output, cache = env.path("run-erc", "first", "x").parent, env.path("run-erc", "cache", "x").parent
        return run_command(env, _run_erc_command(env, output, cache), timeout=110, folder=output), output, cache

    return env.once("first-run", make)


@probe("training", "run-erc-valid", "examples/run_erc.py on a tiny manifest corpus with frozen backbones: finite "
       "model, strict-JSON results", FINITE)
def _(env):
    return Trial(lambda: _first_run(env)[0], lambda run: run_outputs_problem(run.folder), kind="script")


@probe("training", "run-erc-nan-cache", "run_erc.py again on a cache whose speech shard holds a NaN: the shard is "
       "re-extracted (finite model) or the run stops with a named error; never a NaN model", EITHER)
def _(env):
    first, _, cache = _first_run(env)
    if first.code != 0:
        raise HarnessError(f"the first run_erc run failed (exit {first.code}): {first_line(first.stderr[-300:])}")
    poisoned = env.fresh_folder("run-erc-nan-cache")
    shutil.rmtree(poisoned)
    shutil.copytree(cache, poisoned)
    _corrupt(poisoned, "nan")
    output = env.fresh_folder("run-erc-second")
    command = _run_erc_command(env, output, poisoned)
    return Trial(lambda: run_command(env, command, timeout=110, folder=output),
                 lambda run: run_outputs_problem(run.folder), after=lambda: non_finite_weights(output), kind="script")


# ====================================================================================================== config
def _config(factory, check=None):
    return lambda env: Trial(lambda: factory(env), check)


def _mister_e_config(**values):
    def make(env):
        from mister_e_hf import MisterEConfig

        return MisterEConfig(speech_embed_dim=8, text_embed_dim=8, **values)

    return make


for _name, _values, _what in (
    ("projection-dim-negative", {"projection_dim": -1}, "projection_dim=-1"),
    ("dropout-above-one", {"dropout": 1.5}, "dropout=1.5"),
    ("fusion-unknown", {"fusion": "nope"}, "fusion='nope'"),
    ("projection-dim-string", {"projection_dim": "abc"}, "projection_dim='abc'"),
    ("unknown-key", {"projection_dimm": 16}, "projection_dimm=16 (a typo)"),
    ("no-labels", {"id2label": {}}, "id2label={} (no classes)"),
):
    probe("config", _name, f"MisterEConfig({_what})", NAMED)(
        _config(_mister_e_config(**_values), (lambda values: lambda config: "accepted: " + ", ".join(
            f"{k}={getattr(config, k, '(dropped)')!r}" for k in values))(_values)))


def _processor_config(**values):
    def make(env):
        from mister_e_hf import MisterEProcessor

        return MisterEProcessor(tokenizer=env.tokenizer, **values)

    return make


for _name, _values in (("max-text-length-zero", {"max_text_length": 0}),
                       ("unknown-argument", {"max_audio_second": 10})):
    probe("config", f"processor-{_name}", f"MisterEProcessor({', '.join(f'{k}={v!r}' for k, v in _values.items())})",
          NAMED)(_config(_processor_config(**_values), lambda processor: "accepted"))


@probe("config", "from-backbones-missing-folder", "MisterEModel.from_backbones on a folder that does not exist", NAMED)
def _(env):
    from mister_e_hf import MisterEModel

    return Trial(lambda: MisterEModel.from_backbones(None, str(env.folder / "no-such-backbone"), **TINY_HEAD))


@probe("config", "standardize-unfitted", "a forward with `standardize_embeddings=True` before the statistics are "
       "fitted", NAMED)
def _(env):
    import torch

    model = env.build("emb", standardize_embeddings=True)[0]

    def act():
        with torch.no_grad():
            return model(**_embeds())

    return Trial(act)


# ====================================================================================================== main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tag", default="now", help="Results go to <output-dir>/robustness-<tag>.{json,md}.")
    parser.add_argument("--only", default=None, help=f"Comma-separated areas to run, of {', '.join(AREAS)}.")
    parser.add_argument("--match", default=None, help="Run only the probes whose id contains this text.")
    parser.add_argument("--source-root", default=None,
                        help="The source tree to probe: its src/ is imported, its CLI and examples/run_erc.py run "
                             "(default: the repository holding this script).")
    parser.add_argument("--output-dir", default="benchmarks/results",
                        help="Where the JSON and markdown results go (relative paths: to the repository root).")
    parser.add_argument("--keep-temp", action="store_true", help="Keep the temporary folder of models and files.")
    parser.add_argument("--list", action="store_true", help="List the probes and exit.")
    args = parser.parse_args()
    args.areas = AREAS if args.only is None else tuple(a.strip() for a in args.only.split(",") if a.strip())
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown areas {unknown}; choose from {', '.join(AREAS)}")
    return args


def import_toolkit(source_root: Path):
    """Imports mister_e_hf from `source_root/src` (before any installed copy) and checks where it came from."""
    global PACKAGE_DIR, SCRIPT_PATHS
    src = (source_root / "src").resolve()
    if not (src / "mister_e_hf" / "__init__.py").is_file():
        sys.exit(f"error: {src} holds no mister_e_hf package (from --source-root {source_root}).")
    sys.path.insert(0, str(src))
    import mister_e_hf

    PACKAGE_DIR = Path(mister_e_hf.__file__).resolve().parent
    if src not in PACKAGE_DIR.parents:
        sys.exit(f"error: mister_e_hf was imported from {PACKAGE_DIR}, not from {src}.")
    SCRIPT_PATHS = (str((source_root / "examples" / "run_erc.py").resolve()),)
    print(f"mister_e_hf imported from {mister_e_hf.__file__}", flush=True)
    return mister_e_hf


def quiet_logging():
    """The toolkit's and transformers' log records go to the probes' collectors only, not to the terminal."""
    import transformers

    logging.getLogger().addHandler(logging.NullHandler())
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.disable_progress_bar()


def source_revision(source_root: Path) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(source_root), *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "src", "examples")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "modified_files": len(status.splitlines()) if status else 0}


def count(records: list[dict]) -> dict:
    counts = {outcome: 0 for outcome in (*OUTCOMES, HARNESS)}
    for record in records:
        counts[record["outcome"]] += 1
    counts["probes"] = len(records)
    counts["passing"] = sum(r["passed"] for r in records)
    return counts


COLUMNS = [*OUTCOMES, HARNESS, "passing"]


def render(payload: dict) -> str:
    records, counts = payload["probes"], payload["counts"]
    revision = payload["source"]
    modified = (f", {revision['modified_files']} files modified in src/ and examples/" if revision["modified_files"]
                else "")
    hardware = payload["hardware"]
    parts = [f"# Robustness probes: {payload['tag']}", "",
             f"{counts['overall']['probes']} probes of the public surface (processor, collator, model forward, "
             f"pipeline, streaming, corpus loaders, embedding cache, CLI, training, config) on tiny random backbones, "
             f"against the source tree at commit {revision['commit']}{modified}. "
             f"Run time {payload['seconds']:.0f} s on {hardware.get('cpu_count')} CPUs "
             f"(torch {hardware.get('torch', '?')}, transformers {hardware.get('transformers', '?')}).",
             "", "Outcomes: **named error** (the toolkit refused with its own clear error), **finite result** "
             "(returned, and the probe's validator says the result is right), **obscure crash** (an exception from "
             "inside torch, numpy, datasets, tokenizers, transformers or pyarrow, a bare Python error from an "
             "operation in the toolkit, or a CLI traceback), **silent garbage** (returned, but the validator says the "
             "result is wrong). A probe *passes* when its outcome is the one a correct toolkit gives (some accept "
             "either a named error or a validated result).", "", "**Outcomes overall**", "",
             markdown_table(["probes", *COLUMNS], [[counts["overall"]["probes"],
                                                   *[counts["overall"][c] for c in COLUMNS]]]),
             "", "**Outcomes by area**", "",
             markdown_table(["area", "probes", *COLUMNS],
                            [[area, c["probes"], *[c[k] for k in COLUMNS]] for area, c in counts["by_area"].items()])]
    failing = [r for r in records if not r["passed"]]
    parts += ["", f"**Probes that do not pass ({len(failing)})**", ""]
    if failing:
        parts.append(markdown_table(["probe", "what", "expected", "outcome", "finding"],
                                    [[r["id"], r["description"], r["expected"], r["outcome"],
                                      r["finding"].replace("|", "\\|")] for r in failing]))
    else:
        parts.append("None.")
    source = "" if revision["tree"] == "this repository" else f" --source-root CHECKOUT-OF-{revision['commit']}"
    only = payload["arguments"].get("only")
    parts += ["", "Notes:", "",
              "- A raise counts as the toolkit's when the traceback ends on a `raise` statement in the package (or in "
              "`examples/run_erc.py`) or the error's type is defined there, and its message has at least three words. "
              "Two cases also count as named: an operating-system error naming the path, raised by the toolkit's own "
              "file access through the standard library only (not through datasets or torch); and `MisterEConfig`'s "
              "strict-dataclass validation (huggingface_hub runs the config's declared field types and its "
              "validator).",
              "- CLI probes run in-process through `mister_e_hf.cli.main`, the exception behind a one-line error "
              "recorded: a one-line error from an obscure cause (e.g. `range() arg 3 must not be zero`) is an obscure "
              "crash. Two probes run the CLI, and two run `examples/run_erc.py`, as separate processes.",
              f"- Every probe, with its finding, is in `robustness-{payload['tag']}.json`. Rerun with "
              f"`python benchmarks/robustness.py --tag {payload['tag']}{source}{f' --only {only}' if only else ''}`."]
    return "\n".join(parts) + "\n"


def print_area(area: str, records: list[dict]) -> None:
    rows = [[r["id"].split("/", 1)[1], r["expected"], r["outcome"], "yes" if r["passed"] else "NO",
             (r["finding"][:110] + "...") if len(r["finding"]) > 110 else r["finding"]] for r in records]
    print(f"\n## {area}\n")
    print(markdown_table(["probe", "expected", "outcome", "pass", "finding"], rows), flush=True)


def main():
    args = parse_args()
    if args.list:
        for item in PROBES:
            if item.area in args.areas and (args.match is None or args.match in item.id):
                print(f"{item.id:55s} {item.expected:30s} {item.description}")
        return
    source_root = Path(args.source_root or REPO_ROOT).resolve()
    temp = Path(tempfile.mkdtemp(prefix="mister-e-robustness-"))
    os.environ.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      MISTER_E_CACHE=str(temp / "default-embedding-cache"), HF_HOME=str(temp / "hf-home"),
                      MPLBACKEND="Agg")
    import_toolkit(source_root)
    quiet_logging()
    env = Env(temp, source_root)
    start = time.perf_counter()
    records = []
    try:
        for area in args.areas:
            selected = [p for p in PROBES if p.area == area and (args.match is None or args.match in p.id)]
            if not selected:
                continue
            area_records = [run_probe(item, env) for item in selected]
            records += area_records
            print_area(area, area_records)
    finally:
        if args.keep_temp:
            print(f"Temporary files kept in {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)
    seconds = time.perf_counter() - start
    by_area = {area: count([r for r in records if r["area"] == area]) for area in args.areas
               if any(r["area"] == area for r in records)}
    payload = {"benchmark": "robustness", "tag": args.tag,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "arguments": {k: v for k, v in vars(args).items() if k not in ("areas", "source_root", "output_dir")},
               "source": {"tree": "this repository" if source_root == REPO_ROOT.resolve() else "another checkout",
                          **source_revision(source_root)},
               "hardware": hardware_info(), "seconds": round(seconds, 1),
               "counts": {"overall": count(records), "by_area": by_area}, "probes": records}
    folder = Path(args.output_dir) if Path(args.output_dir).is_absolute() else REPO_ROOT / args.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"robustness-{args.tag}.json", folder / f"robustness-{args.tag}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(render(payload))
    overall = payload["counts"]["overall"]
    print("\n" + markdown_table(["probes", *COLUMNS], [[overall["probes"], *[overall[c] for c in COLUMNS]]]))
    print(f"\n{seconds:.0f} s. Wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
