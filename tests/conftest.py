"""Shared fixtures of the text-to-image tests: stand-ins for the shipped VAE and judge."""

import pytest
import torch

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.judge import train_judge


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A random course-config VAE saved as the shipped one is (the tests never depend on trained weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    AutoencoderKL(AutoencoderConfig.course()).save(path)
    return path


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory):
    """A barely trained judge: the scripts run, their numbers mean nothing."""
    path = tmp_path_factory.mktemp("judge")
    train_judge(n_images=16, steps=2, batch_size=8, verbose=False).save(path)
    return path
