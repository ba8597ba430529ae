"""Noise, v and flow prediction, trained side by side at equal compute, graded by prompt adherence.

    python 06_stable_diffusion_architecture/compare_objectives.py --config cpu --out runs/objectives
    python 06_stable_diffusion_architecture/compare_objectives.py --model v=checkpoints/course_t2i_cpu
    python 06_stable_diffusion_architecture/compare_objectives.py --config gpu --steps 2100 --out runs/obj_gpu
    python 06_stable_diffusion_architecture/compare_objectives.py \
        --results 06_stable_diffusion_architecture/results           # and copy the table there
    COURSE_FAST=1 python 06_stable_diffusion_architecture/compare_objectives.py --out /tmp/o  # a minute

Trainings of train_text_to_image.py with the same config, seed, data, batch and number of steps, one per
objective (``--objectives``, default all three): SD 1.x's eps prediction, SD 2.x's v prediction on the
zero-terminal-SNR schedule sampled from its last timestep (``--objective v``), and SD 3's flow matching
(``--objective flow``). The networks are the same, so a step costs the same compute. Each is shipped into
``--out`` (``eps/``, ``v/``, ``flow/``) and graded by evaluate.py on its four fixed prompt sets: the eps and v
models with DDIM (and DPM-Solver++(2M)), the flow model with Euler steps (``flow_euler``, shift 1.0), each at
4, 8 and 25 steps, guidance 3. Writes ``objectives.json`` and ``objectives.md`` (the table, with 95% Wilson
intervals) to ``--out``, and copies them to ``--results``.

On a GPU give ``--steps``: the ``gpu`` preset's step count is an upper bound meant for ``--minutes``, and a
time budget would give the two objectives different step counts (2,100 is what the shipped model trained).

A training whose shipped folder already exists is skipped (so a killed comparison resumes: run it again),
and ``--model OBJECTIVE=PATH`` grades a model trained elsewhere instead of training one (``--eps-model PATH``
is ``--model eps=PATH``); its steps and wall time are read from its model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.judge import JUDGE_DIR
from common.metrics import wilson_interval
from common.runtime import describe, is_fast
from common.text_to_image import CONFIG_NAMES, OBJECTIVES, TextToImageConfig
from common.weights import file_sha256, model_files

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SETS = ("held-out 1 object", "held-out 2 objects", "paraphrased 1 object", "paraphrased 2 objects")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default=None, choices=CONFIG_NAMES, help="default: tiny under COURSE_FAST, else cpu"
    )
    p.add_argument(
        "--steps", type=cli.positive_int, default=None, help="override the config's optimizer steps"
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "runs" / "objectives"),
        help="trainings (train_eps/, ...), shipped models (eps/, v/, flow/), the table",
    )
    p.add_argument(
        "--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES), help="which to compare"
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="OBJECTIVE=PATH",
        help="a shipped model of the same config to grade for that objective instead of training one",
    )
    p.add_argument("--eps-model", default=None, help="the same as --model eps=PATH")
    p.add_argument(
        "--results", default=None, help="also copy objectives.json and objectives.md into this folder"
    )
    p.add_argument("--sampling-steps", nargs="+", type=cli.positive_int, default=[4, 8, 25])
    p.add_argument("--no-dpmpp", action="store_true", help="grade the eps and v models with DDIM only")
    p.add_argument("--n", type=cli.positive_int, default=None, help="prompts per set (default 100; fast 2)")
    p.add_argument("--guidance", type=cli.nonnegative_float, default=3.0)
    p.add_argument("--vae", default=None, help="passed to train_text_to_image.py (default: the config's VAE)")
    p.add_argument("--judge", default=None, help="passed to evaluate.py (default: checkpoints/shapes_judge)")
    p.add_argument("--cache-dir", default=None, help="passed to train_text_to_image.py (the latent cache)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


def shown(path: str | Path) -> str:
    """A path as a command line shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def run_script(script: str, args: list[str]) -> str:
    """Run a chapter script in a fresh interpreter (as a learner would type it); returns the command line."""
    cmd = [sys.executable, str(HERE / script), *args]
    command = "python " + " ".join(shlex.quote(a) for a in [shown(HERE / script), *args])
    print(f"\n$ {command}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:  # its own message is above; stop here with one line
        sys.exit(f"{command} failed with exit status {proc.returncode}; see its output above")
    return command


def card_training(folder: Path) -> dict:
    """Steps, config and wall time from a shipped model's card (written by train_text_to_image.py)."""
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    steps = re.search(r"- steps: ([\d,]+) x batch", text)
    minutes = re.search(r"- wall time: ([\d.]+) min", text)
    config = re.search(r"- config: `(\w+)`", text)
    command = re.search(r"- command: `([^`]+)`", text)
    return {
        "steps": int(steps.group(1).replace(",", "")) if steps else None,
        "seconds": float(minutes.group(1)) * 60 if minutes else None,
        "config": config.group(1) if config else None,
        "command": command.group(1) if command else None,
    }


def loop_seconds(run_dir: Path) -> float | None:
    """The training loop's own time from the run's log.csv: latent caching and start-up left out, so the two
    objectives compare whichever of them encoded the shared latent cache. Each invocation's clock starts at
    0, so a resumed run adds up the last time of every invocation."""
    log = run_dir / "log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    restarts = [i for i in range(1, len(seconds)) if seconds[i] < seconds[i - 1]]  # a new invocation's rows
    return sum(seconds[i - 1] for i in restarts) + seconds[-1] if seconds else None


def train_or_reuse(objective: str, config: str, args, out: Path) -> dict:
    """Ship ``out/objective`` by training, unless it is there (or ``--model objective=PATH`` names one)."""
    if objective in args.reuse:
        folder = Path(args.reuse[objective])
        return {"folder": shown(folder), "reused": True, "loop_seconds": None, **card_training(folder)}
    folder, run_dir = out / objective, out / f"train_{objective}"
    command = None
    if (folder / "model_index.json").is_file():
        print(f"{shown(folder)} is already shipped: its training is skipped (delete the folder to retrain)")
    else:
        train_args = [
            "--config",
            config,
            "--objective",
            objective,
            "--out",
            shown(run_dir),
            "--ship",
            shown(folder),
            "--seed",
            str(args.seed),
            "--no-progress",
        ]
        for flag, value in (("--steps", args.steps), ("--vae", args.vae), ("--cache-dir", args.cache_dir)):
            if value is not None:
                train_args += [flag, str(value)]
        command = run_script("train_text_to_image.py", train_args)
    timing_path = run_dir / "timing.json"
    if timing_path.is_file():  # the wall time summed over invocations (a killed run resumed counts once)
        timing = json.loads(timing_path.read_text())
        info = {"steps": timing["steps"], "seconds": timing["seconds"], "config": config}
    else:
        info = card_training(folder)
    return {
        "folder": shown(folder),
        "reused": command is None,
        **info,
        "loop_seconds": loop_seconds(run_dir),
        "command": command or card_training(folder)["command"],
    }


def fingerprint(eval_args: list[str], model: Path, judge: Path) -> dict:
    """What an evaluation's numbers depend on: its arguments and the weights of the model and the judge."""

    def digest(folder: Path) -> dict:
        return {str(f.relative_to(folder)): file_sha256(f) for f in model_files(folder)}

    return {"args": eval_args, "fast": is_fast(), "model": digest(model), "judge": digest(judge)}


def evaluate(objective: str, folder: str, runs: list[str], args, out: Path) -> tuple[str, list[dict]]:
    """evaluate.py on one model; returns its command and the rows of its results.csv. An evaluation already in
    ``out`` with the same arguments, model and judge is read back instead of run again."""
    eval_dir = out / f"eval_{objective}"
    eval_args = [
        "--model",
        folder,
        "--runs",
        *runs,
        "--guidance",
        str(args.guidance),
        "--out",
        shown(eval_dir),
        "--seed",
        str(args.seed),
    ]
    if args.n is not None or not is_fast():
        eval_args += ["--n", str(args.n or 100)]
    if args.judge is not None:
        eval_args += ["--judge", str(args.judge)]
    key = fingerprint(eval_args, ROOT / folder, Path(args.judge) if args.judge else JUDGE_DIR)
    key_path = eval_dir / "fingerprint.json"
    command = "python " + " ".join(shlex.quote(a) for a in [shown(HERE / "evaluate.py"), *eval_args])
    done = key_path.is_file() and (eval_dir / "results.csv").is_file()
    if done and json.loads(key_path.read_text()) == key:
        print(f"{shown(eval_dir)} already holds this evaluation (same arguments and weights): read back")
    else:
        t0 = time.perf_counter()
        run_script("evaluate.py", eval_args)
        print(f"evaluated in {time.perf_counter() - t0:.0f} s")
        cli.atomic_write(key_path, json.dumps(key, indent=2) + "\n")
    with open(eval_dir / "results.csv", newline="") as f:
        return command, list(csv.DictReader(f))


def score(row: dict) -> dict:
    """The share of prompts with every attribute right, with its 95% Wilson interval."""
    n, p = int(row["n"]), float(row["all"])
    low, high = wilson_interval(round(p * n), n)
    return {"all": p, "n": n, "low": low, "high": high}


def table_rows(objective: str, csv_rows: list[dict]) -> list[dict]:
    """One row per (sampler, steps): the four sets' "all" scores and the sampling time summed over them."""
    rows: dict[tuple, dict] = {}
    for r in csv_rows:
        if not r["steps"]:  # real renders and VAE reconstructions: the references, kept apart
            continue
        key = (r["sampler"], int(r["steps"]))
        row = rows.setdefault(
            key, {"objective": objective, "sampler": key[0], "steps": key[1], "sampling_seconds": 0.0}
        )
        row[r["set"]] = score(r)
        row["sampling_seconds"] += float(r["seconds"])
    return list(rows.values())


def eps_weighting(config: TextToImageConfig) -> str:
    return "plain MSE" if config.snr_gamma is None else f"Min-SNR gamma {config.snr_gamma:g}"


def weighting(objective: str, config: TextToImageConfig) -> str:
    """How each objective's loss weights the timesteps, in words."""
    return {
        "eps": f"eps prediction on SD 1.x's schedule, {eps_weighting(config)}",
        "v": "v prediction on the zero-terminal-SNR schedule, sampled from its last timestep, "
        + (
            "plain MSE"
            if config.snr_gamma is None
            else f"Min-SNR gamma {config.snr_gamma:g} on SNR + {config.snr_offset:g}"
        ),
        "flow": f"flow matching (plain MSE, logit-normal t), sampled with shift {config.flow_shift}",
    }[objective]


def markdown(result: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['all']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"

    def minutes(seconds: float | None) -> str:
        return "n/a" if seconds is None else f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"

    trainings = result["trainings"]
    lines = [
        f"Measured with `{result['command']}` ({result['machine']}); {result['n']} prompts per set, "
        f"guidance {result['guidance']}, seed {result['seed']}; config `{result['config']}`. "
        "A cell is the share of prompts with every attribute right (two objects: both objects and the "
        "relation), with its 95% Wilson interval.",
        "",
    ]
    for objective in result["objectives"]:
        t = trainings[objective]
        lines.append(
            f"- {objective} ({result['weighting'][objective]}): `{t['folder']}`, {t['steps']} steps; "
            "training loop "
            f"{minutes(t['loop_seconds'])}, whole command {minutes(t['seconds'])}"
            + (f" (`{t['command']}`)" if t.get("command") else "")
        )
    lines += [
        "",
        "The whole command includes start-up and, for the first training, encoding the latent "
        "cache that they share; the training loop is the equal-compute part.",
        "",
        "| objective | sampler | steps | " + " | ".join(SETS) + " | sampling s | training loop |",
        "|---|---|---|" + "---|" * len(SETS) + "---|---|",
    ]
    for r in result["rows"]:
        loop = minutes(trainings[r["objective"]]["loop_seconds"])
        lines.append(
            f"| {r['objective']} | {r['sampler']} | {r['steps']} | "
            + " | ".join(cell(r[s]) for s in SETS)
            + f" | {r['sampling_seconds']:.0f} | {loop} |"
        )
    for r in result["references"]:
        lines.append(f"| ({r['sampler']}) | | | " + " | ".join(cell(r[s]) for s in SETS) + " | | |")
    return "\n".join(lines) + "\n"


def reuse_models(args) -> dict:
    """{objective: folder} from --model OBJECTIVE=PATH (and --eps-model); a one-line error for a bad one."""
    pairs = list(args.model) + ([f"eps={args.eps_model}"] if args.eps_model else [])
    reuse = {}
    for pair in pairs:
        objective, _, path = pair.partition("=")
        if objective not in OBJECTIVES or not path:
            raise cli.UsageError(
                f"--model {pair}: expected OBJECTIVE=PATH with OBJECTIVE one of {OBJECTIVES}"
            )
        if not (Path(path) / "model_index.json").is_file():
            raise cli.UsageError(
                f"--model {pair}: no shipped pipeline there (no model_index.json); give a folder that "
                "train_text_to_image.py --ship wrote"
            )
        reuse[objective] = path
    return reuse


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = args.config or ("tiny" if is_fast() else "cpu")
    out = cli.writable_dir(args.out, "--out")
    results = cli.writable_dir(args.results, "--results") if args.results else None
    args.reuse = reuse_models(args)
    objectives = [o for o in OBJECTIVES if o in args.objectives]
    steps = args.sampling_steps
    diffusion = ["ddim"] + ([] if args.no_dpmpp else ["dpmpp_2m"])
    samplers = {"eps": diffusion, "v": diffusion, "flow": ["flow_euler"]}
    print(describe())
    trainings = {o: train_or_reuse(o, config, args, out) for o in objectives}
    for o, t in trainings.items():
        if t["config"] != config:
            print(f"warning: the {o} model's config is {t['config']!r}, not {config!r}", flush=True)
    if len({t["steps"] for t in trainings.values()}) > 1:
        print(
            "warning: not equal compute: "
            + ", ".join(f"{o} trained {t['steps']} steps" for o, t in trainings.items()),
            flush=True,
        )
    rows, references = [], []
    for objective in objectives:
        runs = [f"{s}:{k}" for s in samplers[objective] for k in steps]
        command, csv_rows = evaluate(objective, trainings[objective]["folder"], runs, args, out)
        trainings[objective]["evaluate"] = command
        rows += table_rows(objective, csv_rows)
        if (
            objective == objectives[0]
        ):  # the judge on real renders and on the VAE's reconstructions: the ceilings
            for name in ("real renders", "VAE reconstructions"):
                ref = {"sampler": name}
                for r in csv_rows:
                    if r["sampler"] == name:
                        ref[r["set"]] = score(r)
                references.append(ref)
    command = "python " + " ".join(
        shlex.quote(a) for a in [shown(__file__), *(argv if argv is not None else sys.argv[1:])]
    )
    result = {
        "config": config,
        "seed": args.seed,
        "n": int(rows[0][SETS[0]]["n"]),
        "guidance": args.guidance,
        "sampling_steps": steps,
        "shift": TextToImageConfig.named(config).flow_shift,
        "eps_weighting": eps_weighting(TextToImageConfig.named(config)),
        "objectives": objectives,
        "weighting": {o: weighting(o, TextToImageConfig.named(config)) for o in objectives},
        "command": command,
        "machine": describe(),
        "trainings": trainings,
        "rows": rows,
        "references": references,
    }
    cli.atomic_write(out / "objectives.json", json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    cli.atomic_write(out / "objectives.md", md)
    print(f"\n{md}\nwritten: {shown(out / 'objectives.json')}, {shown(out / 'objectives.md')}")
    if results is not None:
        for name in ("objectives.json", "objectives.md"):
            shutil.copyfile(out / name, results / name)
        print(f"copied into {shown(results)}")
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
