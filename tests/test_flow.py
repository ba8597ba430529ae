"""Flow matching (SD 3) pinned against diffusers: FlowMatchEulerDiscreteScheduler's timesteps, sigmas, every
Euler step and whole loops, its forward process (scale_noise), and the SD 3 training utilities' logit-normal
timestep sampling."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from common.flow import (
    FlowEulerSampler,
    FlowSchedule,
    add_noise,
    logit_normal_density,
    sample_sigmas_logit_normal,
    shift_sigma,
    velocity_target,
)
from common.samplers import sample_loop, sampler_from_diffusers

SHAPE = (2, 4, 8, 6)  # non-square latents


def pair(shift, steps, T=1000):
    config = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).config
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    return sampler_from_diffusers("flow_euler", config, steps), ref


def velocity_model(seed=0):
    """A fixed stand-in for the transformer: a near-identity channel mix of z plus a sinusoid of t."""
    g = torch.Generator().manual_seed(seed)
    W = 0.9 * torch.eye(SHAPE[1]) + 0.1 * torch.randn(SHAPE[1], SHAPE[1], generator=g)
    phase = torch.rand(1, *SHAPE[1:], generator=g) * 6.28
    return lambda z, t: torch.einsum("dc,bchw->bdhw", W, z) + 0.3 * torch.sin(float(t) / 97.0 + phase)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_timesteps_and_sigmas_equal_diffusers(shift, steps):
    ours, ref = pair(shift, steps)
    assert isinstance(ours, FlowEulerSampler) and ours.schedule.shift == shift
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-5 * 1000)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_every_step_equals_diffusers(shift, steps):
    ours, ref = pair(shift, steps)
    v_fn = velocity_model()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t_ours, t in zip(ours.timesteps, ref.timesteps, strict=True):
        v = v_fn(z, t)
        z_ref = ref.step(v, t, z).prev_sample
        diff = (ours.step(v, t_ours, z) - z_ref).abs().max().item()
        assert diff <= 1e-5 * max(1.0, z_ref.abs().max().item()), diff
        z = z_ref


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_whole_loop_equals_diffusers(shift):
    ours, ref = pair(shift, 20)
    v_fn = velocity_model(1)
    z_ref = z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in ref.timesteps:
        z_ref = ref.step(v_fn(z_ref, t), t, z_ref).prev_sample
    seen = []
    z_ours = sample_loop(v_fn, z_T, ours, callback=lambda i, t, z, x0: seen.append(x0))
    torch.testing.assert_close(z_ours, z_ref, rtol=0, atol=1e-5 * max(1.0, z_ref.abs().max().item()))
    assert len(seen) == 20


def test_forward_process_and_target_equal_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    z0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[[2, 7]]
    sigma = ref.sigmas[[2, 7]]
    torch.testing.assert_close(add_noise(z0, eps, sigma), ref.scale_noise(z0, t, eps))
    # the target is the time derivative of the path: check by a finite difference along it
    h = 1e-3
    z0, eps = z0.double(), eps.double()
    slope = (add_noise(z0, eps, 0.4 + h) - add_noise(z0, eps, 0.4 - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(z0, eps).double())


def test_logit_normal_sampling_equals_diffusers_and_matches_its_density():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ours = sample_sigmas_logit_normal(4096, 0.0, 1.0, g1)
    ref = compute_density_for_timestep_sampling(
        "logit_normal", 4096, logit_mean=0.0, logit_std=1.0, generator=g2
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # the density integrates to one and its histogram agrees with the samples
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    assert abs(torch.trapezoid(logit_normal_density(grid), grid).item() - 1) < 1e-3
    counts = torch.histc(ours.double(), bins=10, min=0, max=1) / len(ours)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = torch.special.ndtr(torch.logit(edges[1:])) - torch.special.ndtr(torch.logit(edges[:-1]))
    assert (counts - expected).abs().max() < 0.03


def test_shift_fixes_the_ends_and_adds_noise_in_between():
    sigma = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    shifted = shift_sigma(sigma, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > sigma[1:-1]).all()
    assert abs(shift_sigma(0.5, 3.0) - 0.75) < 1e-12


def test_predict_x0_inverts_the_path():
    z0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    sampler = FlowEulerSampler(FlowSchedule(shift=3.0), 10)
    t = sampler.timesteps[3]
    z_t = add_noise(z0, eps, sampler.sigmas[3])
    x0_pred = sampler.schedule.predict_x0(velocity_target(z0, eps), z_t, t)
    torch.testing.assert_close(x0_pred, z0, atol=1e-5, rtol=0)


def test_bad_input_names_what_is_expected():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        sampler_from_diffusers("flow_euler", {"use_dynamic_shifting": True}, 10)
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        sampler_from_diffusers("flow_euler", {}, 0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        FlowEulerSampler(FlowSchedule(), 4).step(torch.zeros(1), 123.0, torch.zeros(1))
    with pytest.raises(ValueError, match="flow_euler"):
        sampler_from_diffusers("euler_a", {}, 10)
