"""The VAE objective: each term against a direct computation, hinge values, the adaptive
weight, disc start, LPIPS."""

import lpips as lpips_package
import pytest
import torch
import torchvision
from torch import nn

from common.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from common.losses import (
    LPIPS,
    PatchDiscriminator,
    VAELoss,
    VAELossWeights,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    lpips_backbone_available,
    lpips_backbone_path,
    reconstruction_loss,
)


def images(seed: int, batch: int = 2, side: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_reconstruction_loss_is_mean_absolute_error():
    x, y = images(0), images(1)
    expected = sum(abs(a - b) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
    assert reconstruction_loss(x, y).item() == pytest.approx(expected, rel=1e-5)


def test_kl_loss_sums_latent_dims_and_averages_batch():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    mu, logvar = moments[:, :4], moments[:, 4:]
    per_sample = [0.5 * (mu[i] ** 2 + logvar[i].exp() - 1 - logvar[i]).sum() for i in range(3)]
    assert kl_loss(DiagonalGaussian(moments)).item() == pytest.approx(sum(per_sample).item() / 3, rel=1e-5)
    # the closed form agrees with torch.distributions
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(kl_loss(DiagonalGaussian(moments)), expected)


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2   -> mean 2.5 / 3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert (
        hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0
    )  # a confident D pays nothing
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


class ToyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(torch.tanh(self.body(z)))


def test_adaptive_weight_against_autograd_by_hand():
    torch.manual_seed(0)
    decoder, critic = ToyDecoder(), nn.Conv2d(3, 1, 3)
    x, z = images(2, side=8), torch.randn(2, 4, 8, 8)
    x_hat = decoder(z)
    rec = (x - x_hat).abs().mean()
    gan = -critic(x_hat).mean()
    lam = adaptive_weight(rec, gan, decoder.conv_out.weight)

    g_rec = torch.autograd.grad(rec, decoder.conv_out.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, decoder.conv_out.weight, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad
    # the graph survives (retain_graph): the caller can still backpropagate the total
    (rec + lam * gan).backward()
    assert decoder.conv_out.weight.grad is not None


def test_adaptive_weight_is_clamped_and_zero_without_grad():
    decoder = ToyDecoder()
    x_hat = decoder(torch.randn(1, 4, 8, 8))
    rec = x_hat.abs().mean()
    gan = 0.0 * x_hat.sum()  # no adversarial gradient: the ratio would be ||g_rec|| / 1e-4
    assert adaptive_weight(rec, gan, decoder.conv_out.weight, max_weight=0.5).item() == 0.5
    with torch.no_grad():
        x_hat = decoder(torch.randn(1, 4, 8, 8))
        assert adaptive_weight(x_hat.abs().mean(), x_hat.mean(), decoder.conv_out.weight).item() == 0.0


def test_patch_discriminator_shape_and_init():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 128, 2),
        (128, 256, 2),
        (256, 512, 1),
        (512, 1, 1),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.modules()) == 4
    assert d(images(0, side=64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 patches
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=0)


def test_lpips_missing_backbone_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: nothing may be downloaded
    assert lpips_backbone_path("alex") == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert not lpips_backbone_available("alex")
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth.*\n.*IMAGENET1K_V1"):
        LPIPS(net="alex")
    with pytest.raises(FileNotFoundError, match="lpips weight 0"):
        VAELoss(VAELossWeights(gan=0.0))
    with pytest.raises(ValueError, match="alex"):
        LPIPS(net="resnet")
    assert not any(tmp_path.rglob("*.pth"))


def test_lpips_loads_a_cached_backbone(tmp_path, monkeypatch):
    """A stand-in 'cached' AlexNet (random weights) in an empty TORCH_HOME is what LPIPS picks up."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet()
    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.save(alexnet.state_dict(), path)
    assert lpips_backbone_available("alex")
    metric = LPIPS(net="alex")
    torch.testing.assert_close(metric.model.net.slice1[0].weight, alexnet.features[0].weight)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the package passes torchvision a deprecated flag
def test_lpips_wrapper_matches_the_package_and_stays_frozen():
    torch.manual_seed(0)
    ours = LPIPS(net="alex", pretrained_backbone=False)
    ref = lpips_package.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ref.load_state_dict(ours.model.state_dict())
    x, y = images(3), images(4)
    ours.train()  # must not switch the package's dropout on
    assert not ours.model.training
    torch.testing.assert_close(ours(x, y), ref(x, y).flatten())
    assert ours(x, y).shape == (2,)
    assert ours(x, x).abs().max().item() == 0.0
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.fixture
def setup():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    weights = VAELossWeights(rec=1.0, lpips=0.5, kl=1e-3, gan=0.5, disc_start=10)
    loss = VAELoss(
        weights,
        lpips=LPIPS(pretrained_backbone=False),
        discriminator=PatchDiscriminator(base_channels=8, n_layers=2),
    )
    x = images(5, side=32)
    x_hat, posterior = vae(x, generator=torch.Generator().manual_seed(0))
    return vae, loss, x, x_hat, posterior


def test_vae_loss_before_disc_start(setup):
    vae, loss, x, x_hat, posterior = setup
    total, terms = loss.generator_loss(x, x_hat, posterior, step=9, last_layer=vae.last_layer)
    rec = (x - x_hat).abs().mean()
    perceptual = loss.lpips(x, x_hat).mean()
    kl = posterior.kl().mean()
    torch.testing.assert_close(total, rec + 0.5 * perceptual + 1e-3 * kl)
    torch.testing.assert_close(terms["rec"], rec.detach())
    torch.testing.assert_close(terms["lpips"], perceptual.detach())
    torch.testing.assert_close(terms["kl"], kl.detach())
    assert terms["gan"].item() == 0.0 and terms["gan_weight"].item() == 0.0
    d_loss, d_terms = loss.discriminator_loss(x, x_hat, step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad


def test_vae_loss_after_disc_start(setup):
    vae, loss, x, x_hat, posterior = setup
    total, terms = loss.generator_loss(x, x_hat, posterior, step=10, last_layer=vae.last_layer)
    nll = (x - x_hat).abs().mean() + 0.5 * loss.lpips(x, x_hat).mean()
    gan = -loss.discriminator(x_hat).mean()
    lam = adaptive_weight(nll, gan, vae.last_layer)
    assert lam.item() > 0
    torch.testing.assert_close(total, nll + 1e-3 * posterior.kl().mean() + lam * 0.5 * gan)
    torch.testing.assert_close(terms["gan_weight"], lam)
    torch.testing.assert_close(terms["gan"], gan.detach())
    total.backward()
    assert vae.encoder.conv_in.weight.grad is not None

    d_loss, d_terms = loss.discriminator_loss(x, x_hat, step=10)
    expected = hinge_d_loss(loss.discriminator(x), loss.discriminator(x_hat.detach()))
    torch.testing.assert_close(d_loss, expected)
    loss.discriminator.zero_grad()
    vae.zero_grad()
    d_loss.backward()
    assert vae.decoder.conv_out.weight.grad is None  # the D step never reaches the VAE
    assert loss.discriminator.main[0].weight.grad is not None

    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, x_hat, posterior, step=10)


def test_vae_loss_without_lpips_or_gan_builds_nothing():
    loss = VAELoss(VAELossWeights(lpips=0.0, gan=0.0))
    assert loss.lpips is None and loss.discriminator is None
    x = images(6)
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    total, terms = loss.generator_loss(x, x.flip(0), posterior, step=10**6)
    torch.testing.assert_close(total, (x - x.flip(0)).abs().mean())
    assert terms["kl"].item() == 0.0
