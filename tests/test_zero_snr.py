"""Zero terminal SNR (Lin et al. 2023) with v prediction and trailing timesteps, pinned against diffusers.

The rescaled schedule must equal diffusers' ``rescale_betas_zero_snr=True`` betas, and DDIM, DDPM and
DPM-Solver++(2M) must follow DDIMScheduler, DDPMScheduler and DPMSolverMultistepScheduler step for step from
the first step (alpha_bar = 0: pure noise, where an eps conversion would divide by zero) to the last.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from common.samplers import sample_loop, sampler_from_diffusers
from common.schedules import NoiseSchedule
from tests.test_samplers import SHAPE, assert_matches, denoiser, pair, reference_loop

SD2 = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
)
ZERO_SNR = dict(prediction_type="v_prediction", spacing="trailing", rescale_betas_zero_snr=True)


@pytest.mark.parametrize("reference", [DDIMScheduler, DDPMScheduler])
def test_rescaled_schedule_equals_diffusers(reference):
    ours, ref = NoiseSchedule.from_diffusers(SD2), reference(**SD2)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, rtol=0, atol=1e-7)
    assert ours.alpha_bar[-1] == 0 and ours.snr(999) == 0  # the last timestep is pure noise
    torch.testing.assert_close(ours.alpha_bar[0], NoiseSchedule.sd15().alpha_bar[0])  # the first is unchanged
    assert NoiseSchedule.from_diffusers(ours.to_diffusers()) == ours


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_every_step_equals_diffusers(name, steps):
    ours, ref = pair(name, steps, **ZERO_SNR)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() and int(ours.timesteps[0]) == 999
    denoise_fn = denoiser()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for t in ref.timesteps:  # the same input to both at every step
        model_output = denoise_fn(z, t)
        z_ref = ref.step(model_output, t, z, generator=g_ref).prev_sample
        z_ours = ours.step(model_output, t, z, generator=g_ours)
        assert torch.isfinite(z_ours).all()
        assert_matches(z_ours, z_ref)
        z = z_ref


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_whole_loop_equals_diffusers(name):
    ours, ref = pair(name, 30, **ZERO_SNR)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert_matches(sample_loop(denoiser(1), z_T, ours), reference_loop(ref, denoiser(1), z_T))


def test_first_step_lands_on_the_v_models_x0():
    """At alpha_bar = 0, z_t is pure noise and x0 = -v: DDIM's first step uses only the model's output."""
    ours = sampler_from_diffusers("ddim", {**SD2, "steps_offset": 0, "set_alpha_to_one": False}, 10)
    v, z = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(ours.schedule.predict_x0(v, z, 999), -v)
    torch.testing.assert_close(ours.schedule.predict_eps(v, z, 999), z)
