"""Chapter 01's ablation checkpoints are what their model cards say, and the notebook's derivations hold."""

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = {
    "vae_ablation_l1": (0.0, 0.0),
    "vae_ablation_l1_kl": (1e-6, 0.0),
    "vae_ablation_l1_kl_gan": (1e-6, 0.5),
}  # name: (SD-convention KL weight, GAN weight)
NOTEBOOK = ROOT / "01_latent_space_learning" / "01_latent_space_learning.ipynb"


def _card(name: str) -> dict:
    return json.loads((ROOT / "checkpoints" / name / "metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_checkpoint_is_the_run_its_card_describes(name):
    folder = ROOT / "checkpoints" / name
    for needed in ("README.md", "config.json", "diffusion_pytorch_model.safetensors", "metrics.json"):
        assert (folder / needed).is_file(), f"{folder / needed} missing"
    card = _card(name)
    kl_sd, gan = ABLATIONS[name]
    assert card["kl_weight_sd"] == pytest.approx(kl_sd) and card["weights"]["gan"] == pytest.approx(gan)
    assert card["weights"]["lpips"] == 0.0
    assert "--init-from checkpoints/vae_photos" in card["command"] and card["data"] == "photos"
    import hashlib

    digest = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert digest == card["sha256"] and digest in (folder / "README.md").read_text()


def test_ablations_differ_only_in_the_loss():
    cards = [_card(name) for name in sorted(ABLATIONS)]
    for key in ("steps", "batch_size", "lr", "warmup", "data"):
        assert len({json.dumps(c[key]) for c in cards}) == 1, f"the ablation runs differ in {key}"


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_card_psnr_reproduces(name):
    """The card's held-out PSNR, recomputed from the shipped weights (the same crops, posterior mean)."""
    from common.autoencoder import AutoencoderKL
    from common.data import Photos
    from common.metrics import psnr

    card = _card(name)
    n = card["metrics"]["n_images"]
    ds = Photos(64, "test", n, seed=1)
    vae = AutoencoderKL.load(ROOT / "checkpoints" / name).eval()
    recs, xs = [], []
    with torch.no_grad():
        for start in range(0, n, 32):
            x = torch.stack([ds[i]["image"] for i in range(start, min(n, start + 32))])
            recs.append(vae.decode(vae.encode(x).mode()).clamp(-1, 1))
            xs.append(x)
    value = psnr(torch.cat(recs), torch.cat(xs))
    assert value == pytest.approx(card["metrics"]["psnr"], abs=0.02), (
        f"{name}: {value:.3f} dB, card {card['metrics']['psnr']:.3f}"
    )


def test_kl_closed_form_matches_monte_carlo_and_torch():
    """Section 4: 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) is E_q[log q - log p]."""
    from torch.distributions import Independent, Normal, kl_divergence

    from common.autoencoder import DiagonalGaussian

    g = torch.Generator().manual_seed(0)
    moments = torch.randn(1, 6, 2, 2, generator=g)  # mu (1, 3, 2, 2), logvar (1, 3, 2, 2)
    post = DiagonalGaussian(moments)
    q = Independent(Normal(post.mean, post.std), 3)
    p = Independent(Normal(torch.zeros_like(post.mean), torch.ones_like(post.mean)), 3)
    z = post.mean + post.std * torch.randn(200_000, 3, 2, 2, generator=g)
    mc = (q.log_prob(z) - p.log_prob(z)).mean()
    assert float(post.kl()) == pytest.approx(float(kl_divergence(q, p)), rel=1e-5)
    assert float(mc) == pytest.approx(float(post.kl()), abs=0.05)


def test_reparameterised_sample_is_differentiable_and_plain_sample_is_not():
    """Section 5: gradients reach mu and sigma through rsample (mu + sigma * eps), never through sample()."""
    from torch.distributions import Normal

    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    sigma = torch.tensor([1.0, 0.5], requires_grad=True)
    assert not Normal(mu, sigma).sample().requires_grad
    torch.manual_seed(0)
    z = Normal(mu, sigma).rsample()
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones(2))
    assert torch.allclose(sigma.grad, (z - mu).detach() / sigma.detach())  # d z / d sigma = eps


def test_snr_with_unscaled_latents():
    """Section 9: SNR(t) = alpha_bar Var(z0) / (1 - alpha_bar), measured on noised data at the last step."""
    from common.schedules import NoiseSchedule

    schedule = NoiseSchedule.sd15()
    g = torch.Generator().manual_seed(0)
    z0 = 2.5 * torch.randn(400_000, generator=g)  # Var 6.25, like the Photos VAE's unscaled latents
    eps = torch.randn(400_000, generator=g)
    T = schedule.num_train_timesteps - 1
    alpha_bar_T = float(schedule.alpha_bar[T])
    snr = alpha_bar_T * 6.25 / (1 - alpha_bar_T)
    assert snr == pytest.approx(6.25 * float(schedule.snr(T)), rel=1e-5)
    z_T = schedule.add_noise(z0, eps, T)
    corr = float(torch.corrcoef(torch.stack([z_T, z0]))[0, 1])
    assert corr == pytest.approx(math.sqrt(snr / (1 + snr)), abs=0.01)


@pytest.mark.skipif(not NOTEBOOK.exists(), reason="notebook not built")
def test_committed_notebook_is_executed_and_small():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "the committed notebook must be executed"
    text = "".join("".join(o.get("text", "")) for c in code for o in c.get("outputs", []))
    assert "mode=cpu" in text, "the committed notebook must come from the real (not fast) run"
    assert NOTEBOOK.stat().st_size < 3_000_000
