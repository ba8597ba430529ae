"""Samplers pinned against diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler.

Each test builds the diffusers scheduler and ours from the same scheduler config, then compares timesteps,
every single step (same model_output and sample fed to both) and whole sampling loops on a fixed denoiser.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    make_sampler,
    sample_loop,
    sampler_from_diffusers,
)
from common.schedules import NoiseSchedule

REFERENCE = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = {
    "leading": dict(timestep_spacing="leading", steps_offset=1),  # SD 1.x
    "trailing": dict(timestep_spacing="trailing", steps_offset=0),
    "linspace": dict(timestep_spacing="linspace", steps_offset=0),
}
SHAPE = (2, 4, 8, 8)


def config(name, prediction_type="epsilon", spacing="leading", **extra):
    """A full diffusers scheduler config: every option ours reads is spelt out (no defaults involved)."""
    cfg = {**SD, **SPACINGS[spacing], "prediction_type": prediction_type}
    if name in ("ddpm", "ddim"):
        cfg["clip_sample"] = False
    if name == "ddpm":
        cfg["variance_type"] = "fixed_small"
    if name == "ddim":
        cfg["set_alpha_to_one"] = False
    if name == "dpmpp_2m":
        cfg.update(lower_order_final=True, final_sigmas_type="zero")
    cfg.update(extra)
    return cfg


def pair(name, steps, **cfg_kw):
    cfg = config(name, **cfg_kw)
    ref = REFERENCE[name].from_config(cfg)
    ref.set_timesteps(steps)
    return sampler_from_diffusers(name, cfg, steps), ref


def assert_matches(ours, ref, rel=1e-5):
    """max |ours - ref| <= rel * max(1, max |ref|), the project's parity bar."""
    err, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * {scale:.3g}"


def denoiser(seed=0):
    """A fixed deterministic stand-in for a UNet: a random linear map of z plus a sinusoid of t.

    The map is near the identity, roughly what a trained eps or v model does at high noise, so the
    latents stay O(1) along the whole trajectory and a relative tolerance stays strict.
    """
    g = torch.Generator().manual_seed(seed)
    C = SHAPE[1]
    W = 0.9 * torch.eye(C) + 0.1 * torch.randn(C, C, generator=g) / C**0.5
    phase = torch.rand(1, C, SHAPE[2], SHAPE[3], generator=g) * 6.28

    def denoise_fn(z, t):
        mixed = torch.einsum("dc,bchw->bdhw", W.to(z), z)
        return mixed + 0.2 * torch.sin(float(t) / 97.0 + phase.to(z))

    return denoise_fn


def reference_loop(ref, denoise_fn, z, generator=None, eta=None, start_index=0):
    for t in ref.timesteps[start_index:]:
        kw = {"eta": eta} if eta is not None else {}
        z = ref.step(denoise_fn(z, t), t, z, generator=generator, **kw).prev_sample
    return z


# ---- timesteps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 30, 50, 999])
def test_timesteps_equal_diffusers(name, spacing, steps):
    if name == "dpmpp_2m" and spacing == "leading" and steps == 999:  # diffusers would index past alpha_bar
        with pytest.raises(ValueError, match=r"gives timesteps 1000..2, outside \[0, 999\]"):
            pair(name, steps, spacing=spacing)
        return
    ours, ref = pair(name, steps, spacing=spacing)
    assert ours.timesteps.dtype == torch.long
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps[:5], ref.timesteps[:5])
    assert (ours.timesteps[1:] < ours.timesteps[:-1]).all()
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0


# ---- single steps ---------------------------------------------------------------------------------------
def check_every_step(ours, ref, seed=0, eta=None):
    """Feed both the same random model_output and sample at every timestep; compare each z_prev."""
    g = torch.Generator().manual_seed(seed)
    g_ours, g_ref = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    kw = {"eta": eta} if eta is not None else {}
    for t in ref.timesteps:
        model_output, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        expected = ref.step(model_output, t, z, generator=g_ref, **kw).prev_sample
        assert_matches(ours.step(model_output, t, z, generator=g_ours), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "spacing,steps", [("leading", 50), ("trailing", 50), ("trailing", 30), ("linspace", 7)]
)
def test_ddim_steps_equal_diffusers(prediction_type, spacing, steps):
    ours, ref = pair("ddim", steps, prediction_type=prediction_type, spacing=spacing)
    check_every_step(ours, ref, eta=0.0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_with_eta_and_final_alpha_equal_diffusers(eta, set_alpha_to_one):
    cfg = config("ddim", "v_prediction", set_alpha_to_one=set_alpha_to_one)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(20)
    ours = DDIMSampler(NoiseSchedule.from_diffusers(cfg), 20, eta=eta, set_alpha_to_one=set_alpha_to_one)
    check_every_step(ours, ref, eta=eta)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,steps", [("leading", 20), ("trailing", 20), ("leading", 1000)])
def test_ddpm_steps_with_noise_equal_diffusers(prediction_type, spacing, steps):
    offset = {"steps_offset": 0} if steps == 1000 else {}
    ours, ref = pair("ddpm", steps, prediction_type=prediction_type, spacing=spacing, **offset)
    check_every_step(ours, ref)


def test_ddpm_fixed_large_and_clipping_equal_diffusers():
    # steps_offset=0 so the chain ends at t = 0: diffusers noises every step with t > 0, so with an offset it
    # noises the final step too (sqrt(beta) for fixed_large), where Ho et al.'s Algorithm 2 and ours do not
    ours, ref = pair("ddpm", 10, variance_type="fixed_large", clip_sample=True, steps_offset=0)
    assert ours.clip_sample and ours.variance_type == "fixed_large"
    check_every_step(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "spacing,steps", [("leading", 50), ("trailing", 50), ("linspace", 10), ("leading", 3)]
)
def test_dpmpp_2m_steps_equal_diffusers(prediction_type, spacing, steps):
    ours, ref = pair("dpmpp_2m", steps, prediction_type=prediction_type, spacing=spacing)
    check_every_step(ours, ref)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_2m_final_sigma_min_equal_diffusers(steps, lower_order_final):
    # with final_sigmas_type="sigma_min" the last step is second order unless lower_order_final and < 15 steps
    ours, ref = pair("dpmpp_2m", steps, final_sigmas_type="sigma_min", lower_order_final=lower_order_final)
    check_every_step(ours, ref)


# ---- whole loops ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_50_step_loop_equals_diffusers(name, prediction_type, spacing):
    ours, ref = pair(name, 50, prediction_type=prediction_type, spacing=spacing)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    denoise_fn = denoiser()
    expected = reference_loop(ref, denoise_fn, z_T)
    assert_matches(sample_loop(denoise_fn, z_T, ours), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_loop_equals_diffusers(prediction_type, steps):
    ours, ref = pair("ddpm", steps, prediction_type=prediction_type)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    denoise_fn = denoiser(1)
    expected = reference_loop(ref, denoise_fn, z_T, generator=torch.Generator().manual_seed(7))
    assert_matches(sample_loop(denoise_fn, z_T, ours, generator=7), expected)


def test_ddim_eta_loop_equals_diffusers():
    ours, ref = pair("ddim", 25)
    ours.eta = 0.8
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    expected = reference_loop(ref, denoiser(2), z_T, generator=torch.Generator().manual_seed(9), eta=0.8)
    assert_matches(sample_loop(denoiser(2), z_T, ours, generator=torch.Generator().manual_seed(9)), expected)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_img2img_start_index_equals_diffusers(name):
    ours, ref = pair(name, 30)
    g = torch.Generator().manual_seed(10)
    z0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t_start = ref.timesteps[12:13].repeat(SHAPE[0])
    z_start = ours.add_noise(z0, eps, t_start)
    assert_matches(z_start, ref.add_noise(z0, eps, t_start))
    expected = reference_loop(ref, denoiser(), z_start, start_index=12)
    assert_matches(sample_loop(denoiser(), z_start, ours, start_index=12), expected)


# ---- seeding, callbacks, interface ----------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_same_seed_same_result(name, opts):
    sampler = make_sampler(name, NoiseSchedule(), 10, **opts)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = sample_loop(denoiser(), z_T, sampler, generator=123)
    b = sample_loop(denoiser(), z_T, sampler, generator=torch.Generator().manual_seed(123))
    c = sample_loop(denoiser(), z_T, sampler, generator=124)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", SAMPLERS)
def test_low_precision_latents_keep_their_dtype(name):
    sampler = make_sampler(name, NoiseSchedule(), 5)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z32 = sample_loop(denoiser(), z_T, sampler, generator=0)
    z16 = sample_loop(denoiser(), z_T.bfloat16(), sampler, generator=0)
    assert z16.dtype == torch.bfloat16
    assert (z16.float() - z32).abs().max() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SAMPLERS)
def test_cuda_latents_with_a_cpu_generator_match_cpu(name):
    sampler = make_sampler(name, NoiseSchedule(), 10)
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    on_cpu = sample_loop(denoiser(), z_T, sampler, generator=3)
    on_cuda = sample_loop(denoiser(), z_T.cuda(), sampler, generator=3)
    assert on_cuda.device.type == "cuda"
    assert_matches(on_cuda.cpu(), on_cpu, rel=1e-4)


def test_callback_sees_every_step_and_x0_pred():
    schedule = NoiseSchedule(prediction_type="v_prediction")
    sampler = make_sampler("dpmpp_2m", schedule, 8)
    seen = []
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample_loop(denoiser(), z_T, sampler, callback=lambda i, t, z, x0: seen.append((i, int(t), z, x0)))
    assert [i for i, *_ in seen] == list(range(8))
    assert [t for _, t, *_ in seen] == sampler.timesteps.tolist()
    # the final step of DPM-Solver++ lands on its x0 prediction
    assert_matches(seen[-1][2], seen[-1][3])


def test_dpmpp_2m_needs_reset_between_runs():
    sampler = DPMSolverPP2MSampler(NoiseSchedule(), 5)
    z = torch.zeros(SHAPE)
    for t in sampler.timesteps:
        z = sampler.step(torch.randn(SHAPE), t, z)
    with pytest.raises(ValueError, match="reset"):
        sampler.step(torch.randn(SHAPE), sampler.timesteps[0], z)
    sampler.reset()
    sampler.step(torch.randn(SHAPE), sampler.timesteps[0], z)


def test_sd15_config_gives_the_samplers_a_diffusers_pipeline_would_use():
    sd15 = {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "trained_betas": None,
    }
    for name, cls in REFERENCE.items():
        ref = cls.from_config(sd15)
        ref.set_timesteps(25)
        ours = sampler_from_diffusers(name, sd15, 25)
        assert torch.equal(ours.timesteps, ref.timesteps), name
    assert (
        sampler_from_diffusers("dpmpp_2m", sd15, 25).timestep_spacing == "linspace"
    )  # diffusers' DPM default
    ddim = sampler_from_diffusers("ddim", sd15, 25)
    assert ddim.final_alpha_bar == ddim.schedule.alpha_bar[0] and not ddim.clip_sample


def test_defaults_are_sd15s():
    ddim = DDIMSampler(NoiseSchedule(), 50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1 and ddim.eta == 0.0
    assert DDPMSampler(NoiseSchedule()).timesteps.tolist() == list(range(999, -1, -1))


# ---- bad input ------------------------------------------------------------------------------------------
def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        make_sampler("euler", NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        sampler_from_diffusers("pndm", {}, 10)
    with pytest.raises(TypeError):
        make_sampler("ddim", NoiseSchedule(), 10, etta=0.5)  # a misspelt option is never swallowed


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_count_names_both_numbers(name, steps):
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps}.*num_train_timesteps=1000"):
        make_sampler(name, NoiseSchedule(), steps)


def test_bad_options_name_the_choices():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        DDIMSampler(schedule, 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"outside \[0, 999\]"):
        DDIMSampler(schedule, 1000, steps_offset=1)  # 999 + 1 is past the last training timestep
    with pytest.raises(ValueError, match="repeats timesteps"):
        DPMSolverPP2MSampler(schedule, 1000, steps_offset=0)  # n + 1 = 1001 points in 1000 timesteps
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        DDPMSampler(schedule, 10, variance_type="learned")
    with pytest.raises(ValueError, match="zero, sigma_min"):
        DPMSolverPP2MSampler(schedule, 10, final_sigmas_type="one")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(schedule, 10, eta=-1.0)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        DDPMSampler(schedule, 10).step(torch.zeros(SHAPE), 3, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="torch.Generator, an int seed or None"):
        DDPMSampler(schedule, 10).step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE), generator=1.5)
