"""Weights on disk: reading, checking, saving and fetching them, in one place below every module that loads
a model.

    read_json / weights_file / read_safetensors    a config or weights file, with errors that name the file
    check_state / load_weights / build_on_meta     a state dict checked key by key and shape by shape, then
                                                   assigned into a module (built on the meta device when big)
    save_model / read_model                        one model in diffusers' folder layout: config.json +
                                                   diffusion_pytorch_model.safetensors
    file_sha256 / module_sha256 / count_parameters what a model card records
    write_model_card                               a card's text, then its files with their sizes and sha256
    sd15_path                                      where the course finds Stable Diffusion 1.5

The optional weights and data the course can use when you have them live where their libraries look:

    python -m common.weights fetch sd15     Stable Diffusion 1.5 (diffusers folder, fp32 safetensors) into
                                            $SD15_PATH, or the Hugging Face cache when $SD15_PATH is unset
    python -m common.weights fetch lpips    LPIPS's AlexNet ImageNet backbone, into the torch hub cache
    python -m common.weights fetch mnist    torchvision's MNIST, into the course's data folder ($COURSE_DATA)

Without a network each says in one line what failed (exit status 2); nothing else in the course downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from common import cli
from common.data import DATA_ROOT, torchvision_dataset
from common.losses import backbone_weights, lpips_backbone_path

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # the file name diffusers' from_pretrained looks for
CONFIG_NAME = "config.json"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# the diffusers folder at fp32: configs, tokenizer, the three parts' full-precision safetensors
SD15_FILES = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
FETCH_COMMAND = "python -m common.weights fetch {}"


# --- reading --------------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing")
    return json.loads(path.read_text())


def weights_file(folder: Path, names: tuple[str, ...], part: str) -> Path:
    """The first of ``names`` in ``folder``; a missing file is an error that names what was expected."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    other = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = (
        f" (found {other}: only safetensors are read; convert them with safetensors.torch.save_file)"
        if other
        else ""
    )
    raise FileNotFoundError(f"the {part} weights are missing: expected {folder / names[0]}{hint}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``; a truncated or foreign file is a ValueError that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated: "
            "download or save it again"
        ) from None


# --- checking and loading ------------------------------------------------------------------------------
def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """A ValueError naming the first keys when a tensor of ``state`` has another shape than in
    ``expected``, or ``state`` has missing or unexpected keys; silent when it fits ``expected`` exactly."""
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} in the file but the model "
                f"expects {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{where}: {len(missing)} missing keys, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Assign ``state`` into ``module`` (on meta or not) after ``check_state``; errors name the key."""
    check_state(module.state_dict(), state, where)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def build_on_meta(cls, config, big: bool = True):
    """``cls(config)`` without allocating (meta device) when ``big``; small models are simply built on the
    CPU, where random init costs less than the first meta-device init (it imports torch's reference ops)."""
    if not big:
        return cls(config)
    with torch.device("meta"):
        return cls(config)


# --- one model in diffusers' folder layout -------------------------------------------------------------
def save_model(
    module: nn.Module, folder: str | Path, config: dict, *, dtype: torch.dtype | None = None
) -> Path:
    """Write ``config`` (diffusers' keys, ``_class_name`` first) as config.json and the weights (cast to
    ``dtype`` when given) as diffusion_pytorch_model.safetensors into ``folder``, each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in module.state_dict().items()}
    metadata = {"format": "pt"}
    cli.atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return folder


def read_model(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, weights) of a folder written by ``save_model`` (or a diffusers ``unet/`` or ``vae/``)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} must hold {CONFIG_NAME} and {WEIGHTS_NAME} (a model folder in diffusers' layout)"
        )
    return read_json(folder / CONFIG_NAME, "the model config"), read_safetensors(folder / WEIGHTS_NAME)


# --- what a model card records ---------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_files(folder: str | Path) -> list[Path]:
    """The weights and configs of a model folder (every .safetensors and .json under it), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))


def write_model_card(folder: str | Path, text: str, files: list[str] | None = None) -> Path:
    """``folder/README.md``: ``text`` (markdown), then a "Files" section with each file's size and sha256 (the
    names in ``files``, default ``model_files(folder)``), so a reader can check what they downloaded."""
    folder = Path(folder)
    paths = [folder / f for f in files] if files is not None else model_files(folder)
    rows = "\n".join(
        f"| `{p.relative_to(folder).as_posix()}` | {p.stat().st_size:,} | `{file_sha256(p)}` |" for p in paths
    )
    size = sum(p.stat().st_size for p in paths)
    files_section = (
        f"## Files\n\n{size / 1e6:.1f} MB in all.\n\n| file | bytes | sha256 |\n|---|---|---|\n{rows}\n"
    )
    return cli.atomic_write(folder / "README.md", text.rstrip() + "\n\n" + files_section)


# --- the optional weights, fetched on request ----------------------------------------------------------
def sd15_path() -> Path | None:
    """Where the course finds Stable Diffusion 1.5: $SD15_PATH (a diffusers folder or a single .safetensors
    file), else the Hugging Face cache's copy that ``fetch sd15`` leaves there; None when neither exists."""
    if os.environ.get("SD15_PATH"):
        return Path(os.environ["SD15_PATH"]).expanduser()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(SD15_REPO, allow_patterns=SD15_FILES, local_files_only=True))
    except (OSError, ValueError):  # not cached (huggingface_hub's LocalEntryNotFoundError is an OSError)
        return None
    return folder if (folder / "model_index.json").is_file() else None


def fetch_sd15() -> Path:
    from huggingface_hub import snapshot_download

    local_dir = os.environ.get("SD15_PATH")
    folder = snapshot_download(
        SD15_REPO,
        allow_patterns=SD15_FILES,
        local_dir=str(Path(local_dir).expanduser()) if local_dir else None,
    )
    return Path(folder)


def fetch_lpips() -> Path:
    path = lpips_backbone_path("alex")  # torchvision's own download, into the hub cache LPIPS reads
    backbone_weights("alex").get_state_dict(progress=True, model_dir=str(path.parent))
    return path


def fetch_mnist() -> Path:
    for train in (True, False):
        torchvision_dataset("mnist", DATA_ROOT, train=train, download=True)
    return DATA_ROOT / "MNIST"


FETCHERS = {"sd15": fetch_sd15, "lpips": fetch_lpips, "mnist": fetch_mnist}


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m common.weights", description=__doc__.split("\n\n")[2])
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download optional weights or data into the place the course looks")
    fetch.add_argument("what", choices=sorted(FETCHERS), help="what to fetch")
    args = p.parse_args(argv)
    try:
        where = FETCHERS[args.what]()
    except (OSError, RuntimeError, ValueError) as e:  # no network, a refused connection, a full disk
        retry = FETCH_COMMAND.format(args.what)
        raise cli.UsageError(
            f"could not fetch {args.what} ({type(e).__name__}: {cli.one_line(e)}); it needs "
            f"network access: run `{retry}` again when online"
        ) from None
    print(f"{args.what}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m common.weights"))
