"""The package as users get it: a wheel built from the sdist, installed into a fresh virtual environment without the
source tree, carries every file the package reads at run time and finishes a training run to a model card.

The heavy dependencies (torch, transformers, ...) are not installed again: the fresh environment sees the test
interpreter's site-packages through a `.pth` file that names those folders. Python adds such a folder to `sys.path`
without reading the `.pth` files inside it, so the editable install's path to the source tree stays out; every
test below checks that `mister_e_hf` is imported from the fresh environment all the same.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT, common_args
from huggingface_hub import ModelCard


PACKAGE = REPO_ROOT / "src" / "mister_e_hf"
TEMPLATE = PACKAGE / "model_card_template.md"
TEMPLATE_COPY = REPO_ROOT / "model_cards" / "mister_e.md"


def _clean_env() -> dict:
    """The environment for the fresh interpreter: nothing that puts the source tree or user packages on its path."""
    unwanted = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in unwanted}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(command, cwd, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _package_files() -> set[str]:
    """The files of the package in the source tree, as wheel paths (`mister_e_hf/...`), byte code and hidden files
    (an editor's swap file) left out."""
    return {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
            and not any(part.startswith(".") for part in path.relative_to(PACKAGE).parts)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built as `python -m build` does (the sdist first, then the wheel from the unpacked sdist), from a copy
    of the project's build inputs, so that the working tree (its `build/` and `*.egg-info`) is left as it was."""
    folder = tmp_path_factory.mktemp("build")
    source = folder / "source"
    source.mkdir()
    for path in REPO_ROOT.iterdir():  # setup.cfg, pyproject.toml, README.md, MANIFEST.in, ...
        if path.is_file():
            shutil.copy2(path, source / path.name)
    shutil.copytree(PACKAGE.parent, source / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    backend = "import sys; from setuptools import build_meta; print(build_meta.build_{}(sys.argv[1]))"
    sdist = _run([sys.executable, "-c", backend.format("sdist"), folder / "dist"], cwd=source)
    with tarfile.open(folder / "dist" / sdist.stdout.split()[-1]) as archive:
        archive.extractall(folder / "unpacked", filter="data")
    (unpacked,) = (folder / "unpacked").iterdir()
    built = _run([sys.executable, "-c", backend.format("wheel"), folder / "dist"], cwd=unpacked)
    return folder / "dist" / built.stdout.split()[-1]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The python of a fresh virtual environment with the wheel installed (with pip, entry points included)."""
    folder = tmp_path_factory.mktemp("installed")
    environment = folder / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", environment], cwd=folder)
    python = environment / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-compile",
          "--quiet", wheel], cwd=folder)
    # the dependencies, after the install, so that pip sees an empty environment
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder)
    dependencies = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    dependencies = [d for d in dict.fromkeys(dependencies) if Path(d).is_dir()]
    (Path(purelib.stdout.strip()) / "test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python


def test_package_source_has_no_symlinks_and_one_card_template():
    """A symlink breaks where symlinks do not exist (and setuptools copies it as whatever it points to); the
    repository's copy of the template must be the package's, byte for byte."""
    links = sorted(str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*") if p.is_symlink())
    assert not links, f"symlinks in the package: {links}; make them real files"
    assert TEMPLATE.read_bytes() == TEMPLATE_COPY.read_bytes(), (
        f"{TEMPLATE_COPY.relative_to(REPO_ROOT)} differs from {TEMPLATE.relative_to(REPO_ROOT)}, the template that "
        f"the package reads: edit the package's file, then copy it to {TEMPLATE_COPY.relative_to(REPO_ROOT)}")


def test_wheel_carries_every_file_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("mister_e_hf/")}
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")))
    source = _package_files()
    assert {"mister_e_hf/model_card_template.md", "mister_e_hf/metrics/erc_metrics/erc_metrics.py"} <= source
    assert not source - shipped, f"not in the wheel (add them to package_data in setup.cfg): {sorted(source - shipped)}"
    assert not shipped - source, f"in the wheel but not in the source tree: {sorted(shipped - source)}"
    assert b"mister-e = mister_e_hf.cli:main" in entry_points


def test_installed_wheel_trains_to_a_model_card_and_loads(installed, tiny_backbones, corpus, tmp_path):
    """`examples/run_erc.py`, copied out of the source tree, runs on the installed package to a written model card
    with the measured metrics, and the saved model loads with `AutoModel` and predicts there."""
    script = tmp_path / "script" / "run_erc.py"
    script.parent.mkdir()
    shutil.copy2(REPO_ROOT / "examples" / "run_erc.py", script)
    output = tmp_path / "run"
    _run([installed, script, *common_args(tiny_backbones, corpus, output, tmp_path / "cache"), "--num_train_epochs",
          "1"], cwd=tmp_path)

    card = (output / "README.md").read_text(encoding="utf-8")
    test = json.loads((output / "test_results.json").read_text())
    assert f"| test weighted f1 | {100 * test['test_weighted_f1']:.1f} |" in card
    assert "{{" not in card and "{#" not in card
    metrics = {r.metric_type: r.metric_value for r in ModelCard.load(output / "README.md").data.eval_results
               if r.dataset_split == "test"}
    assert metrics["weighted_f1"] == pytest.approx(test["test_weighted_f1"])

    row = json.loads((corpus / "test.jsonl").read_text().splitlines()[0])
    probe = tmp_path / "script" / "probe.py"
    probe.write_text(
        "import json, sys\n"
        "import torch\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "import mister_e_hf\n"
        "model = AutoModel.from_pretrained(sys.argv[1]).eval()\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "conversation = [{'text': sys.argv[2], 'audio': sys.argv[3]}]\n"
        "with torch.no_grad():\n"
        "    logits = model(**processor(conversations=[conversation])).logits\n"
        "print(json.dumps({'package': mister_e_hf.__file__, 'model': sys.modules[type(model).__module__].__file__,\n"
        "                  'processor': sys.modules[type(processor).__module__].__file__,\n"
        "                  'finite': bool(torch.isfinite(logits).all()), 'shape': list(logits.shape)}))\n")
    result = _run([installed, probe, output, row["text"], corpus / row["audio"]], cwd=tmp_path)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    environment = installed.parent.parent.resolve()
    for name in ("package", "model", "processor"):
        path = Path(loaded[name]).resolve()
        assert path.is_relative_to(environment) and not path.is_relative_to(REPO_ROOT), (name, path)
    assert loaded["finite"] and loaded["shape"][:2] == [1, 1]
