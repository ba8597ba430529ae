"""common.weights: the shared checks, and ``python -m common.weights fetch`` offline (one line, exit 2) and
with local stand-ins for the downloads (the files land where the course looks for them). Nothing here
downloads."""

import gzip
import socket
import struct

import numpy as np
import pytest
import torch
from torch import nn

from common import cli, weights
from common.data import _mnist_on_disk
from common.losses import lpips_backbone_available, lpips_backbone_path


def fetch(what: str, capsys) -> tuple[int, str, str]:
    rc = cli.run(weights.main, ["fetch", what], prog="python -m common.weights")
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: every name lookup and connection fails, as on a machine without one."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SD15_PATH", str(tmp_path / "sd15"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "DATA_ROOT", tmp_path / "data")


@pytest.mark.parametrize("what", ["sd15", "lpips", "mnist"])
def test_fetch_offline_fails_in_one_line(what, offline, capsys):
    rc, out, err = fetch(what, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("python -m common.weights: error: could not fetch " + what)
    assert f"python -m common.weights fetch {what}" in err  # says how to retry
    assert "Traceback" not in err + out


def test_fetch_unknown_name_is_refused(capsys):
    rc, _, err = fetch("sd21", capsys)
    assert rc == 2 and "invalid choice" in err and "sd15" in err


def test_fetch_sd15_writes_into_sd15_path(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, *, allow_patterns, local_dir=None, **kwargs):
        calls.append((repo_id, allow_patterns, local_dir))
        (tmp_path / "sd15").mkdir()
        (tmp_path / "sd15" / "model_index.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("SD15_PATH", str(tmp_path / "sd15"))
    rc, out, _ = fetch("sd15", capsys)
    assert rc == 0 and str(tmp_path / "sd15") in out
    repo, patterns, local_dir = calls[0]
    assert repo == "stable-diffusion-v1-5/stable-diffusion-v1-5" and local_dir == str(tmp_path / "sd15")
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and not any("fp16" in p for p in patterns)
    assert weights.sd15_path() == tmp_path / "sd15"


def test_fetch_lpips_fills_the_torch_hub_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def download_url_to_file(url, dst, *args, **kwargs):  # the stand-in for the AlexNet download
        assert url.startswith("https://download.pytorch.org/models/alexnet")
        torch.save({"features.0.weight": torch.zeros(1)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    assert not lpips_backbone_available("alex")
    rc, out, _ = fetch("lpips", capsys)
    assert rc == 0 and str(lpips_backbone_path("alex")) in out
    assert lpips_backbone_available("alex") and lpips_backbone_path("alex").is_relative_to(tmp_path / "torch")


def test_fetch_mnist_fills_the_course_data_folder(monkeypatch, tmp_path, capsys):
    import torchvision.datasets.mnist as tv_mnist

    def download_and_extract_archive(url, download_root, filename, md5=None, **kwargs):
        name = filename.removesuffix(".gz")  # a valid 2-item idx file, as the real archive unpacks to
        if "images" in name:
            data = struct.pack(">IIII", 2051, 2, 28, 28) + np.zeros((2, 28, 28), np.uint8).tobytes()
        else:
            data = struct.pack(">II", 2049, 2) + bytes([3, 7])
        (tmp_path / "data" / "MNIST" / "raw" / name).write_bytes(gzip.decompress(gzip.compress(data)))

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", download_and_extract_archive)
    monkeypatch.setattr(weights, "DATA_ROOT", tmp_path / "data")
    rc, out, _ = fetch("mnist", capsys)
    assert rc == 0 and str(tmp_path / "data" / "MNIST") in out
    assert _mnist_on_disk(tmp_path / "data")


def test_check_state_names_the_key():
    a, b = nn.Linear(2, 3), nn.Linear(2, 4)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 2\) in the file but the model expects"):
        weights.check_state(a.state_dict(), b.state_dict(), "x")
    with pytest.raises(ValueError, match=r"1 missing keys, e.g. \['bias'\]"):
        weights.check_state(a.state_dict(), {"weight": a.weight}, "x")
    with pytest.raises(ValueError, match=r"1 unexpected keys, e.g. \['extra'\]"):
        weights.check_state(a.state_dict(), {**a.state_dict(), "extra": torch.zeros(1)}, "x")
    weights.check_state(a.state_dict(), nn.Linear(2, 3).state_dict(), "x")  # same layout: silent


def test_save_model_and_read_model_round_trip(tmp_path):
    module = nn.Linear(2, 3)
    weights.save_model(module, tmp_path / "m", {"_class_name": "Linear", "in": 2})
    config, state = weights.read_model(tmp_path / "m")
    assert config == {"_class_name": "Linear", "in": 2}
    loaded = weights.load_weights(nn.Linear(2, 3), state, "m")
    assert weights.module_sha256(loaded) == weights.module_sha256(module)
    assert len(weights.file_sha256(tmp_path / "m" / weights.WEIGHTS_NAME)) == 64
    assert weights.count_parameters(module) == 9
