"""Noise schedules and the forward process, pinned against diffusers' schedulers built
with the same config."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.schedules import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule

# SD 1.5's scheduler_config.json (a PNDMScheduler config): the file a pipeline folder ships
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CONFIGS = {  # our schedule name -> diffusers kwargs
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def ours(name: str, T: int = 1000, prediction_type: str = "epsilon") -> NoiseSchedule:
    kw = CONFIGS[name]
    return NoiseSchedule(T, name, kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02), prediction_type)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("reference", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_betas_and_alpha_bar_equal_diffusers(name, reference):
    ref = reference(num_train_timesteps=1000, **CONFIGS[name])
    s = ours(name)
    assert s.betas.dtype == s.alpha_bar.dtype == torch.float32
    torch.testing.assert_close(s.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(s.alphas, ref.alphas, rtol=0, atol=0)
    torch.testing.assert_close(s.alpha_bar, ref.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_short_schedule_equals_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=50, **CONFIGS[name])
    torch.testing.assert_close(ours(name, T=50).alpha_bar, ref.alphas_cumprod, rtol=0, atol=0)


def test_schedule_shapes_and_monotone():
    for name in BETA_SCHEDULES:
        s = ours(name)
        assert s.betas.shape == s.alpha_bar.shape == (1000,)
        assert (s.betas > 0).all() and (s.betas <= 0.999).all()
        assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all(), "alpha_bar must fall with t"
        snr = s.snr(torch.arange(1000))
        assert (snr[1:] < snr[:-1]).all()
        torch.testing.assert_close(snr, s.alpha_bar / (1 - s.alpha_bar))


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_add_noise_and_velocity_equal_diffusers(name):
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    ref = DDPMScheduler(num_train_timesteps=1000, **CONFIGS[name])
    s = ours(name)
    torch.testing.assert_close(s.add_noise(z0, eps, t), ref.add_noise(z0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.v_target(z0, eps, t), ref.get_velocity(z0, eps, t), rtol=0, atol=1e-6)
    # a scalar t broadcasts over the batch
    torch.testing.assert_close(s.add_noise(z0, eps, 300), ref.add_noise(z0, eps, torch.tensor([300] * 4)))


def test_conversions_invert_each_other():
    s = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 400, 990])
    z_t = s.add_noise(z0, eps, t)
    v = s.v_target(z0, eps, t)
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.eps_to_x0(eps, z_t, t), z0, **close)
    torch.testing.assert_close(s.x0_to_eps(z0, z_t, t), eps, **close)
    torch.testing.assert_close(s.v_to_x0(v, z_t, t), z0, **close)
    torch.testing.assert_close(s.v_to_eps(v, z_t, t), eps, **close)
    for kind, output in [("epsilon", eps), ("v_prediction", v), ("sample", z0)]:
        torch.testing.assert_close(s.predict_x0(output, z_t, t, kind), z0, **close)
        torch.testing.assert_close(s.predict_eps(output, z_t, t, kind), eps, **close)


def test_training_target_follows_prediction_type():
    z0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([3, 700])
    assert torch.equal(NoiseSchedule().training_target(z0, eps, t), eps)
    v_schedule = NoiseSchedule(prediction_type="v_prediction")
    assert torch.equal(v_schedule.training_target(z0, eps, t), v_schedule.v_target(z0, eps, t))
    assert torch.equal(NoiseSchedule(prediction_type="sample").training_target(z0, eps, t), z0)


def test_sample_timesteps_is_seeded_and_in_range():
    s = NoiseSchedule()
    t1 = s.sample_timesteps(4096, torch.Generator().manual_seed(3))
    t2 = s.sample_timesteps(4096, torch.Generator().manual_seed(3))
    assert t1.dtype == torch.long and t1.shape == (4096,)
    assert torch.equal(t1, t2)
    assert t1.min() >= 0 and t1.max() <= 999 and len(t1.unique()) > 900


def test_from_diffusers_reads_sd15_config_and_round_trips():
    s = NoiseSchedule.from_diffusers(SD15_SCHEDULER_CONFIG)
    assert s == NoiseSchedule.sd15()
    ref = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    torch.testing.assert_close(s.alpha_bar, ref.alphas_cumprod, rtol=0, atol=0)
    for schedule in [
        NoiseSchedule.ddpm(),
        NoiseSchedule.cosine(prediction_type="v_prediction"),
        NoiseSchedule(),
    ]:
        rebuilt = DDPMScheduler(**schedule.to_diffusers())
        torch.testing.assert_close(rebuilt.alphas_cumprod, schedule.alpha_bar, rtol=0, atol=0)
        assert rebuilt.config.prediction_type == schedule.prediction_type
        assert NoiseSchedule.from_diffusers(rebuilt.config) == schedule


def test_from_diffusers_uses_diffusers_defaults_for_missing_keys():
    assert NoiseSchedule.from_diffusers({}) == NoiseSchedule.ddpm()
    assert NoiseSchedule.from_diffusers(DPMSolverMultistepScheduler().config) == NoiseSchedule.ddpm()


def test_bad_schedule_and_prediction_type_name_the_choices():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        NoiseSchedule(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        NoiseSchedule(prediction_type="eps")
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        NoiseSchedule().predict_x0(torch.zeros(1), torch.zeros(1), 0, "flow")
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        NoiseSchedule.from_diffusers({"beta_schedule": "laplace"})
    with pytest.raises(ValueError, match="trained_betas"):
        NoiseSchedule.from_diffusers({"trained_betas": [0.1, 0.2]})
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample"}


@pytest.mark.parametrize("t", [1000, -1, torch.tensor([0, 1000]), torch.tensor([-5, 3])])
def test_timestep_outside_range_names_the_range(t):
    s = NoiseSchedule()
    z = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        s.add_noise(z, z, t)
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        s.snr(t)


def test_float_timesteps_are_rejected():
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        NoiseSchedule().add_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1.5]))
