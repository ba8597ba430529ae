"""AutoencoderKL: parity with diffusers (same weights, fp32 CPU), parameter names and counts,
bad input, save/load."""

import json

import diffusers
import pytest
import torch

import common.autoencoder as ae
from common.attention import attention_backend
from common.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max |ours - diffusers| = {err:.3g} > {tol:.3g}"


def make_pair(config: AutoencoderConfig, seed: int = 0):
    """A diffusers AutoencoderKL with random weights (norm affines perturbed too) and
    ours holding the same."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**config.to_diffusers()).eval()
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(state)
    return ours, ref


def check_parity(ours: AutoencoderKL, ref, hw: tuple[int, int], batch: int = 2) -> None:
    torch.manual_seed(1)
    x = torch.rand(batch, 3, *hw) * 2 - 1
    with torch.no_grad():
        posterior, ref_posterior = ours.encode(x), ref.encode(x).latent_dist
        assert_parity(posterior.mean, ref_posterior.mean)
        assert_parity(posterior.logvar, ref_posterior.logvar)
        z = torch.randn_like(posterior.mean)
        assert_parity(ours.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("hw", [(32, 32), (32, 24)])
def test_parity_tiny(hw):
    check_parity(*make_pair(AutoencoderConfig.tiny()), hw)


def test_parity_course():
    check_parity(*make_pair(AutoencoderConfig.course()), (32, 24))


@pytest.fixture(scope="module")
def sd15_pair():
    return make_pair(AutoencoderConfig.sd15())


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(64, 64), (64, 48)])
def test_parity_sd15(sd15_pair, hw):
    check_parity(*sd15_pair, hw, batch=1)


@pytest.mark.parametrize("preset", ["tiny", "course", "sd15"])
def test_state_dict_names_and_shapes_equal_diffusers(preset):
    config = getattr(AutoencoderConfig, preset)()
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = {k: tuple(v.shape) for k, v in AutoencoderKL(config).state_dict().items()}
        ref = {
            k: tuple(v.shape)
            for k, v in diffusers.AutoencoderKL(**config.to_diffusers()).state_dict().items()
        }
    assert ours == ref


def test_sd15_parameter_counts():
    """34,163,592 and 49,490,179 are the encoder and decoder alone; quant_conv (72) and
    post_quant_conv (20) are extra."""
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderConfig.sd15())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vae.encoder) == 34_163_592
    assert count(vae.decoder) == 49_490_179
    assert count(vae.quant_conv) == 72 and count(vae.post_quant_conv) == 20


def test_presets_and_downsample_factor():
    assert AutoencoderConfig.sd15().downsample_factor == 8
    assert AutoencoderConfig.tiny().downsample_factor == 2
    assert AutoencoderConfig.course().downsample_factor == 4
    assert AutoencoderConfig.sd15().scaling_factor == 0.18215
    vae = AutoencoderKL(AutoencoderConfig.course())
    assert vae.downsample_factor == 4
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).mean.shape == (1, 4, 16, 16)


def test_config_diffusers_round_trip():
    for preset in ("tiny", "course", "sd15"):
        config = getattr(AutoencoderConfig, preset)()
        with torch.device("meta"):
            ref = diffusers.AutoencoderKL(**config.to_diffusers())
        assert AutoencoderConfig.from_diffusers(ref.config) == config
        assert AutoencoderConfig.from_diffusers(json.loads(json.dumps(dict(ref.config)))) == config


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"act_fn": "relu"}, "act_fn"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "DownEncoderBlock2D"),
        ({"block_out_chanels": [32, 64]}, "unknown"),
    ],
)
def test_from_diffusers_rejects_unsupported(mapping, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig.from_diffusers({**AutoencoderConfig.tiny().to_diffusers(), **mapping})


def test_config_rejects_widths_not_divisible_by_groups():
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(32, 48), norm_num_groups=32)


def test_bad_input_errors():
    vae = AutoencoderKL(AutoencoderConfig.course())  # f = 4
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        vae.encode(torch.zeros(1, 3, 64, 62))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 16, 16))


def test_checkpoint_of_another_config_names_key_and_shapes(tmp_path):
    other = AutoencoderKL(AutoencoderConfig.tiny())
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8))
    with pytest.raises(
        ValueError,
        match=r"encoder\.down_blocks\.1\.resnets\.0\.conv1\.weight.*\(64, 32, 3, 3\).*\(32, 32, 3, 3\)",
    ):
        vae.load_state_dict(other.state_dict())
    other.save(tmp_path / "tiny")
    with pytest.raises(ValueError, match="does not fit this config"):
        vae.load_checkpoint(tmp_path / "tiny")
    deeper = AutoencoderKL(
        AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8)
    )
    with pytest.raises(ValueError, match="missing keys"):
        deeper.load_state_dict(other.state_dict())


def test_posterior_matches_diffusers():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 4, 3) * 3
    moments[0, 4:] = -50.0  # below the clamp
    ours = DiagonalGaussian(moments)
    ref = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(ours.logvar, ref.logvar)
    assert ours.logvar.min().item() == -30.0
    torch.testing.assert_close(ours.kl(), ref.kl())
    torch.testing.assert_close(ours.mode(), ref.mode())
    torch.testing.assert_close(
        ours.sample(torch.Generator().manual_seed(3)), ref.sample(torch.Generator().manual_seed(3))
    )


def test_forward_returns_reconstruction_and_posterior():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        x_hat, posterior = vae(x, sample_posterior=False)
        torch.testing.assert_close(x_hat, vae.decode(posterior.mean))
        a, _ = vae(x, generator=torch.Generator().manual_seed(5))
        b, _ = vae(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x_hat)


def test_attention_goes_through_common_attention(monkeypatch):
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    calls = []
    original = ae.attention
    monkeypatch.setattr(ae, "attention", lambda q, k, v: calls.append(q.shape) or original(q, k, v))
    with torch.no_grad():
        outs = {}
        for backend in ("math", "sdpa", "sliced"):
            with attention_backend(backend, slice_size=7):
                outs[backend] = vae.decode(vae.encode(x).mean)
    assert calls[0] == (1, 1, 64, 64)  # (B, heads, N = 8 * 8, C) at the encoder's bottleneck
    assert len(calls) == 6  # encoder + decoder mid-blocks, three backends
    torch.testing.assert_close(outs["math"], outs["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["math"], outs["sliced"], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    for enabled in (False, True):
        vae.zero_grad()
        vae.enable_gradient_checkpointing(enabled)
        x_hat, posterior = vae(x, sample_posterior=False)
        ((x_hat - x).abs().mean() + posterior.kl().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_round_trip_and_diffusers_reads_our_folder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    folder = vae.save(tmp_path / "vae")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AutoencoderKL.load(folder)
    assert loaded.config == vae.config
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        assert_parity(loaded.decode(z), ref.decode(z).sample)

    # and the other way: a folder diffusers writes loads into ours
    ref.save_pretrained(tmp_path / "from_diffusers")
    again = AutoencoderKL.load(tmp_path / "from_diffusers")
    with torch.no_grad():
        assert_parity(again.decode(z), ref.decode(z).sample)


def test_load_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.load(tmp_path)
