"""Nothing lost, and every bad input a one-line error: common/cli.py, the grader's limits, shipping, resume,
and the user-facing scripts' answers to bad input (exit status 2, one line on stderr, no traceback)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import cli
from common.grade import ERROR, FAILED, PASSED, load_module

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "06_stable_diffusion_architecture" / "generate.py"
EVALUATE = ROOT / "06_stable_diffusion_architecture" / "evaluate.py"
TRAIN_VAE = ROOT / "01_latent_space_learning" / "train_vae.py"


def run_script(*args, cwd=None, timeout=300):
    env = dict(os.environ, COURSE_FAST="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc, *needles):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------------------------------- argument types
@pytest.mark.parametrize(
    "parse, text",
    [
        (cli.positive_int, "0"),
        (cli.positive_int, "-3"),
        (cli.positive_int, "2.5"),
        (cli.nonnegative_float, "-1"),
        (cli.finite_float, "inf"),
        (cli.finite_float, "nan"),
        (cli.positive_float, "0"),
        (cli.fraction, "1.5"),
    ],
)
def test_argument_types_refuse(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_argument_types_accept_and_parser_errors_are_one_line(capsys):
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0 and cli.fraction("1") == 1.0
    p = cli.ArgumentParser(prog="demo")
    p.add_argument("--steps", type=cli.positive_int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--steps", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "demo: error: argument --steps: expected an integer >= 1, got '0' (see --help)"


def test_run_turns_user_errors_into_one_line_and_status_2(capsys):
    def bad(argv):
        raise cli.UsageError("--x is wrong;\n use --y")

    assert cli.run(bad, [], prog="demo") == 2
    assert capsys.readouterr().err == "demo: error: --x is wrong; use --y\n"
    assert cli.run(lambda argv: (_ for _ in ()).throw(FileNotFoundError("no model at m")), [], prog="d") == 2
    assert cli.run(lambda argv: {"a": 1}, []) == 0 and cli.run(lambda argv: 3, []) == 3
    with pytest.raises(ZeroDivisionError):  # a bug in the course keeps its traceback
        cli.run(lambda argv: 1 / 0, [])


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    cli.atomic_write(tmp_path / "a.txt", "hello")

    def fail(path):
        path.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        cli.atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_text() == "hello" and sorted(os.listdir(tmp_path)) == ["a.txt"]


# ----------------------------------------------------------------------------------------- shipping
def _write(files: dict):
    def write(folder):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    return write


def test_ship_keeps_the_users_files_and_replaces_only_its_own(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="not empty and was not shipped by the course"):
        cli.ship(dest, "vae", _write({"config.json": "1"}))
    assert sorted(os.listdir(dest)) == ["notes.txt"]
    cli.ship(dest, "vae", _write({"config.json": "1", "sub/old.bin": "x"}), overwrite=True)
    (dest / "sub" / "user.txt").write_text("also mine")
    cli.ship(dest, "vae", _write({"config.json": "2"}))  # a previous ship of the same kind: no flag needed
    assert (dest / "notes.txt").read_text() == "mine" and (
        dest / "sub" / "user.txt"
    ).read_text() == "also mine"
    assert (dest / "config.json").read_text() == "2" and not (dest / "sub" / "old.bin").exists()
    assert json.loads((dest / cli.MANIFEST).read_text()) == {"kind": "vae", "files": ["config.json"]}
    with pytest.raises(cli.UsageError, match="holds a vae the course shipped, not a pipeline"):
        cli.ship(dest, "pipeline", _write({"model_index.json": "{}"}))
    assert not list(tmp_path.glob(".*tmp"))


def test_save_pretrained_never_empties_a_folder(tmp_path, monkeypatch):
    from common.pipeline import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(cli.UsageError, match="not empty"):
        pipe.save_pretrained("..")  # the folder above holds the user's project
    with pytest.raises(cli.UsageError, match="not empty"):
        pipe.save_pretrained(".")
    assert (tmp_path / "project" / "thesis.tex").read_text() == "years of work"
    pipe.save_pretrained(tmp_path / "project", overwrite=True)  # writes its files beside the user's
    assert (tmp_path / "project" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "project" / "model_index.json").is_file()


def test_fast_mode_never_ships_into_checkpoints(monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    with pytest.raises(cli.UsageError, match="never writes into checkpoints"):
        cli.check_ship(cli.CHECKPOINTS / "vae_shapes", "vae")


def test_shipped_checkpoints_carry_a_manifest_of_their_files():
    for folder in sorted(p for p in cli.CHECKPOINTS.iterdir() if p.is_dir()):
        manifest = cli.read_manifest(folder)
        assert manifest is not None, folder
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {
            cli.MANIFEST
        }
        assert set(manifest["files"]) == on_disk, folder


# ----------------------------------------------------------------------------------------- the grader
@pytest.fixture
def demo_chapter(tmp_path, monkeypatch):
    import common.grade as g

    folder = tmp_path / "99_demo"
    folder.mkdir()
    (folder / "checks.py").write_text(
        "def c_ok(m): assert m.f(2) == 4\n"
        "def c_loop(m): m.loop()\n"
        "def c_exit(m): m.leave()\n"
        "def c_kill(m): m.kill()\n"
        "def c_interrupt(m): m.interrupt()\n"
        "def c_after(m): assert m.f(3) == 9\n"
        "CHECKS = [('f', c_ok), ('loop', c_loop), ('leave', c_exit), ('kill', c_kill), ('interrupt', "
        "c_interrupt), ('after', c_after)]\n"
    )
    (folder / "exercises.py").write_text(
        "import os, sys\n"
        "def f(x): return x * x\n"
        "def loop():\n    while True: pass\n"
        "def leave(): sys.exit(0)\n"
        "def kill(): os._exit(3)\n"
        "def interrupt(): raise KeyboardInterrupt\n"
    )
    monkeypatch.setattr(g, "ROOT", tmp_path)
    return folder


def test_grader_stops_loops_and_reports_exits(demo_chapter, capsys):
    from common.grade import grade, main

    results = {r.name: r for r in grade("99", timeout=1.0)}
    assert {k: r.status for k, r in results.items()} == {
        "f": PASSED,
        "loop": ERROR,
        "leave": FAILED,
        "kill": ERROR,
        "interrupt": FAILED,
        "after": PASSED,
    }
    assert "timed out after 1 s" in results["loop"].detail
    assert "sys.exit(0)" in results["leave"].detail and "exit status 3" in results["kill"].detail
    assert main(["99", "--timeout", "1", "--only", "f", "leave"]) == 1  # anything failing: non-zero
    assert "1/2 exercises passed" in capsys.readouterr().out
    assert cli.run(main, ["99", "--only", "nope"], prog="grade") == 2  # nothing would run: an error
    assert "no exercise named nope" in capsys.readouterr().err


def test_grader_reports_a_file_that_does_not_import(demo_chapter):
    from common.grade import grade

    bad = demo_chapter / "broken.py"
    bad.write_text("def f(x) return x\n")
    results = grade("99", bad, timeout=5.0)
    assert all(r.status == ERROR and "does not import: SyntaxError" in r.detail for r in results)


@pytest.mark.slow
def test_grade_command_line_errors_are_one_line():
    proc = run_script("-m", "common.grade", "42")
    assert_one_line_error(proc, "no single chapter matches '42'")


# ----------------------------------------------------------------------------------------- resume
def _toy_trainer(out, **cfg):
    from common.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    base = dict(steps=4, batch_size=8, lr=1e-2, progress=False, log_every=1, checkpoint_every=2)
    cfg = TrainConfig(**{**base, **cfg})
    return Trainer(
        model, data, lambda m, b, g: torch.nn.functional.mse_loss(m(b[0]), b[1]), cfg, out, device="cpu"
    )


def test_resume_with_another_lr_or_batch_is_refused(tmp_path):
    _toy_trainer(tmp_path, steps=2).fit()
    with pytest.raises(ValueError, match=r"lr 0.01 -> 0.001"):
        _toy_trainer(tmp_path, lr=1e-3)
    with pytest.raises(ValueError, match=r"batch_size 8 -> 16"):
        _toy_trainer(tmp_path, batch_size=16)
    resumed = _toy_trainer(tmp_path, steps=4)  # more steps: the same run, extended
    assert resumed.step == 2


def test_a_killed_checkpoint_write_is_cleaned_up(tmp_path):
    stale = tmp_path / "checkpoints" / "step_0000001.999999999.tmp"  # the pid of no running process
    stale.mkdir(parents=True)
    _toy_trainer(tmp_path, steps=2).fit()
    assert not stale.exists()


# ----------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from common.pipeline import tiny_random_pipeline

    folder = tmp_path_factory.mktemp("safety") / "tiny"
    tiny_random_pipeline().save_pretrained(folder)
    return folder


def test_unknown_scheduler_class_is_an_error_not_ddim(tiny_folder, tmp_path):
    import shutil

    from common.pipeline import StableDiffusion

    folder = tmp_path / "euler"
    shutil.copytree(tiny_folder, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("DDIMScheduler", "EulerDiscreteScheduler"))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*does not implement"):
        StableDiffusion.from_pretrained(folder)
    assert StableDiffusion.from_pretrained(folder, sampler="ddim").sampler_name == "ddim"


def test_truncated_and_foreign_safetensors_are_one_line_errors(tiny_folder, tmp_path):
    from common.pipeline import StableDiffusion

    weights = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "short.safetensors").write_bytes(weights.read_bytes()[:3000])
    (tmp_path / "random.safetensors").write_bytes(os.urandom(100_000))
    for name in ("short", "random"):
        with pytest.raises(ValueError, match="not a readable .safetensors file"):
            StableDiffusion.from_pretrained(
                tmp_path / f"{name}.safetensors"
            )  # refused before SD 1.5 is built


# ----------------------------------------------------------------------------------------- generate.py
@pytest.fixture(scope="module")
def generate():
    return load_module(GENERATE, "_course_generate_safety")


def test_generate_writes_the_format_its_extension_names(generate, tiny_folder, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("COURSE_FAST", "1")
    for name, fmt in (("a.jpg", "JPEG"), ("b.webp", "WEBP"), ("c.png", "PNG")):
        assert (
            generate.main(["a red circle", "--model", str(tiny_folder), "--out", str(tmp_path / name)]) == 0
        )
        assert Image.open(tmp_path / name).format == fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jpg",
        "b.webp",
        "c.png",
    ]  # no temporary file left


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--guidance", "inf"], "argument --guidance: expected a finite number"),
        (["--guidance", "nan"], "argument --guidance: expected a finite number"),
        (["--guidance", "-2"], "argument --guidance: expected a number >= 0"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["--height", "0"], "argument --height: expected an integer >= 1"),
        (["--threads", "-3"], "argument --threads: expected an integer >= 1"),
        (["--out", "picture.gif"], "expected a file name ending in .png, .jpg, .jpeg, .webp"),
        (["--init-image", "{tmp}/not_an_image.png"], "is not an image PIL can read"),
        (["--out", "{tmp}/not_an_image.png/x.png"], "is a file; expected a folder"),
        (["--model", "{tmp}/random.safetensors"], "not a readable .safetensors file"),
    ],
)
def test_generate_bad_input_is_one_line_before_any_work(
    generate, tiny_folder, tmp_path, capsys, args, needle
):
    (tmp_path / "not_an_image.png").write_bytes(os.urandom(2000))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(100_000))
    argv = ["a red circle", "--model", str(tiny_folder), *[a.format(tmp=tmp_path) for a in args]]
    assert cli.run(generate.main, argv, prog="generate.py") == 2
    captured = capsys.readouterr()
    assert needle in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "generated" not in captured.out  # refused before generating


def test_generate_warns_before_a_large_request(generate, tiny_folder, capsys, monkeypatch):
    from common.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(tiny_folder)
    generate.check_size(pipe, 32, 32, 1, 2, 3.0)  # the training size: nothing to say
    assert capsys.readouterr().err == ""
    generate.check_size(pipe, 256, 256, 1, 2, 3.0)
    err = capsys.readouterr().err
    assert (
        "64x the area the model was trained at (32x32)" in err
        and "GiB of memory" in err
        and " s (2 steps" in err
    )
    monkeypatch.setattr(generate, "available_bytes", lambda device: 1000)
    with pytest.raises(cli.UsageError, match="needs at least .* GiB to decode"):
        generate.check_size(pipe, 4096, 4096, 1, 2, 3.0)


@pytest.mark.slow
def test_generate_subprocess_bad_input_has_no_traceback(tiny_folder, tmp_path):
    proc = run_script(GENERATE, "a red circle", "--model", tiny_folder, "--guidance", "inf", cwd=tmp_path)
    assert_one_line_error(proc, "argument --guidance: expected a finite number, got 'inf'")
    (tmp_path / "folder.png").mkdir()
    proc = run_script(GENERATE, "a red circle", "--model", tiny_folder, "--out", "folder.png", cwd=tmp_path)
    assert_one_line_error(proc, "--out folder.png is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


# ----------------------------------------------------------------------------------------- training scripts
@pytest.mark.slow
def test_train_vae_refuses_a_ship_folder_with_the_users_files_before_training(tmp_path):
    ship = tmp_path / "ship"
    ship.mkdir()
    (ship / "keep.txt").write_text("mine")
    proc = run_script(TRAIN_VAE, "--out", tmp_path / "run", "--ship", ship)
    assert_one_line_error(proc, "--ship", "not empty and was not shipped by the course", "--overwrite")
    assert sorted(os.listdir(ship)) == ["keep.txt"] and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["--lr", "nan"], "argument --lr: expected a finite number"),
        (["--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file"),
        (["--resume", "{tmp}/nowhere"], "--resume {tmp}/nowhere: no such checkpoint folder"),
        (["--resume", "{tmp}"], "holds no complete checkpoint"),
        (["--init-from", "{tmp}/nowhere"], "--init-from {tmp}/nowhere: no trained VAE there"),
    ],
)
def test_train_vae_bad_input(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("COURSE_FAST", "1")
    (tmp_path / "file.txt").write_text("")
    train_vae = load_module(TRAIN_VAE, "_course_train_vae_safety")
    argv = ["--out", str(tmp_path / "run"), *[a.format(tmp=tmp_path) for a in args]]
    assert cli.run(train_vae.main, argv, prog="train_vae.py") == 2
    err = capsys.readouterr().err
    assert needle.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_never_touches_shipped_artefacts_in_fast_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    evaluate = load_module(EVALUATE, "_course_evaluate_safety")
    card = cli.CHECKPOINTS / "course_t2i" / "README.md"
    before = card.read_bytes() if card.exists() else None
    assert cli.run(evaluate.main, ["--update-card", "--out", str(tmp_path / "eval")], prog="evaluate.py") == 2
    assert "--update-card would write COURSE_FAST=1 numbers" in capsys.readouterr().err
    assert (card.read_bytes() if card.exists() else None) == before
    argv = [
        "--train-judge",
        "--judge",
        str(cli.CHECKPOINTS / "shapes_judge"),
        "--out",
        str(tmp_path / "eval"),
    ]
    assert cli.run(evaluate.main, argv, prog="evaluate.py") == 2
    assert "never writes into checkpoints" in capsys.readouterr().err
    assert cli.run(evaluate.main, ["--n", "0"], prog="evaluate.py") == 2
    assert "argument --n: expected an integer >= 1" in capsys.readouterr().err
