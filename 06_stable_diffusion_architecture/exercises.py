"""Chapter 06 exercises: the Stable Diffusion pipeline by hand, from which timesteps img2img visits to an
open-ended study of prompts and samplers.

Fill in each function, then grade your file:

    python -m common.grade 06

``pipe`` is a ``common.pipeline.StableDiffusion`` (the checks hand you a tiny random one, so they run in
seconds; the notebook runs the same functions on the course model). Legend: B images, N_k tokens, D_c context
width, f the VAE's factor, h = H / f, w = W / f. Use ``pipe.tokenizer``, ``pipe.text_encoder``, ``pipe.unet``,
``pipe.vae``, ``pipe.make_sampler(name, steps)`` and ``pipe.encode_prompt(prompts)`` freely; do not call
``pipe(...)`` itself in exercises 1 and 2 (the checks compare your code with it).
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------- 1. which steps img2img runs
def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The part of a sampler's (descending) ``timesteps`` that img2img visits at ``strength`` in [0, 1].

    SDEdit starts from the image noised part of the way: with n = len(timesteps) steps in all, it runs the
    last int(n * strength) of them (never more than n), so strength 1 runs them all and strength 0 none.
    Returns the suffix of ``timesteps`` (a LongTensor, possibly empty). This is diffusers' ``get_timesteps``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 2. the sampling loop with CFG
@torch.no_grad()
def sample_with_cfg(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int = 4,
    guidance_scale: float = 5.0,
    seed: int = 0,
    height: int = 16,
    width: int = 16,
) -> torch.Tensor:
    """Text to latents z_0 (1, C, h, w), exactly as
    ``pipe(prompt, ..., output_type="latent")`` with the DDIM sampler.

    1. context: ``pipe.encode_prompt([negative_prompt, prompt])``: (2, N_k, D_c), unconditional first.
    2. z_T: ``torch.randn((1, C, h, w), generator=torch.Generator().manual_seed(seed))`` times the sampler's
       ``init_noise_sigma``; C = ``pipe.vae.config.latent_channels``, h = height // ``pipe.vae_scale_factor``.
    3. for t in sampler.timesteps (sampler = ``pipe.make_sampler("ddim", steps)``): run the UNet once on
       ``torch.cat([z, z])`` with the context, split the output into eps_u, eps_c, guide:
       eps = eps_u + s (eps_c - eps_u), then ``z = sampler.step(eps, t, z)``.
    Hint: ``pipe.unet(z_in, t, context)``; keep the dtype and device of ``pipe``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 3. img2img strength sweep
@torch.no_grad()
def img2img_strength_sweep(
    pipe, image: torch.Tensor, prompt: str, strengths: list[float], *, steps: int = 4, seed: int = 0
) -> list[float]:
    """How far img2img moves away from ``image`` (1, 3, H, W) in [0, 1] as the strength grows.

    For each strength run ``pipe(prompt, image=image, strength=s, num_inference_steps=steps, generator=seed,
    output_type="pt")`` and return the mean absolute pixel difference to the strength-0 result (the image as
    the VAE gives it back: img2img cannot do better than the autoencoder), one float per strength.
    Expect it to grow with the strength, from 0 at strength 0.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 4. a prompt-engineering study
@torch.no_grad()
def prompt_study(
    pipe,
    variants: list[str],
    score_fn,
    *,
    seeds: tuple[int, ...] = (0, 1),
    steps: int = 4,
    size: int = 16,
    guidance_scale: float = 5.0,
) -> dict[str, float]:
    """Score each wording of a prompt, averaged over ``seeds``: which phrasing does the model follow best?

    ``score_fn(images, prompt) -> float`` rates a batch of images (B, 3, size, size) in [0, 1] for a prompt
    (on the course model, use the chapter's judge: the share of images whose attributes match the prompt).
    Return {variant: mean score}. Open-ended: try paraphrases, word order, adding or dropping words, negative
    prompts. Use the same seeds for every variant, so the comparison is about the words, not the noise.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 5. swap the sampler
@torch.no_grad()
def sampler_swap(
    pipe, prompt: str, *, steps: int = 4, reference_steps: int = 20, seed: int = 0, size: int = 16
) -> dict[str, float]:
    """Compare the samplers at equal steps: {sampler name: distance to a many-step reference image}.

    The reference is ``pipe(prompt, sampler="ddim", num_inference_steps=reference_steps, ...)`` (many steps:
    close to the ODE's solution). For every name in ``common.samplers.SAMPLERS`` generate with ``steps`` steps
    and the same seed, and return the mean absolute pixel difference to the reference (lower: closer to the
    converged image). Open-ended: which sampler wins at 4, 8, 16 steps? Why is DDPM (stochastic)
    far from the ODE's answer?
    """
    raise NotImplementedError


# ========================================================================= after SD 1.5 (06b_from_sd2_to_sd3)
# Exercises 6-11 go with the second notebook. The checks grade them against diffusers: its schedulers'
# get_velocity / add_noise, FlowMatchEulerDiscreteScheduler, AdaLayerNormZero and the joint attention of SD 3.


# ---------------------------------------------------------------------------- 6. the v target (SD 2.x)
def v_target(z0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The velocity v = alpha_t eps - sigma_t z_0 with alpha_t = sqrt(alpha_bar_t),
    sigma_t = sqrt(1 - alpha_bar_t).

    z0, eps: (B, C, h, w); alpha_bar_t: (B, 1, 1, 1), one value per batch item. diffusers: ``get_velocity``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 7. from v back to eps
def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The noise a v prediction implies at z_t = alpha_t z_0 + sigma_t eps (derive it:
    solve the two equations).

    It must stay finite at alpha_bar_t = 0 (zero terminal SNR: the last timestep is pure noise), so write it
    without dividing by alpha_t or sigma_t. Shapes as in exercise 6.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------- 8. the flow-matching loss (SD 3)
def flow_matching_loss(velocity_fn, z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow loss at noise levels ``sigma`` (B,) in [0, 1] (Esser et al. 2024,
    eq. 3 and the velocity).

    1. z_t = (1 - t) z_0 + t eps, with t = sigma broadcast per batch item (B, 1, 1, 1);
    2. v = velocity_fn(z_t, 1000 * sigma)   (the network takes diffusers' timestep, 1000 t);
    3. return the mean squared error between v and the target velocity eps - z_0 (a 0-d tensor).
    """
    raise NotImplementedError


# --------------------------------------------------------------------------- 9. one Euler step with the shift
def flow_euler_step(
    v: torch.Tensor, z: torch.Tensor, sigma: float, sigma_next: float, shift: float
) -> torch.Tensor:
    """z at sigma_next from z at sigma and the velocity v there, on SD 3's shifted schedule.

    Shift both noise levels, t' = shift t / (1 + (shift - 1) t), then take one Euler step of dz/dt = v from t'
    to t'_next (sigma_next < sigma: towards the data). diffusers:
    FlowMatchEulerDiscreteScheduler(shift=shift).
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 10. adaLN-Zero modulation
def adaln_zero(x: torch.Tensor, c_vec: torch.Tensor, linear: torch.nn.Linear):
    """DiT's adaptive layer norm with gates, as one MMDiT stream applies it before its attention.

    x: (B, N, D) tokens; c_vec: (B, D) the conditioning vector; linear: nn.Linear(D, 6 D).
    1. (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) = linear(SiLU(c_vec)), six
       (B, D) chunks in that order;
    2. x_mod = LayerNorm(x) * (1 + scale) + shift   (LayerNorm without weights, eps = 1e-6, over D; broadcast
       the (B, D) vectors over the N tokens).
    Return (x_mod, gate, shift_mlp, scale_mlp, gate_mlp), as diffusers' AdaLayerNormZero does.
    """
    raise NotImplementedError


# ------------------------------------------------------------------------- 11. joint attention of two streams
def joint_attention(x: torch.Tensor, c: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
    """SD 3's attention: image tokens x (B, N, D) and text tokens c (B, L, D) attend in one sequence.

    ``attn`` holds each stream's weights: ``to_q, to_k, to_v, to_out[0]`` for the image, ``add_q_proj,
    add_k_proj, add_v_proj, to_add_out`` for the text, and ``attn.heads``. Project each stream with its own
    weights, split into heads (B, heads, tokens, D / heads), concatenate image then text along the tokens,
    run softmax(Q K^T / sqrt(d)) V once, split the result back at N and apply each stream's output projection.
    Return (x_out (B, N, D), c_out (B, L, D)).
    """
    raise NotImplementedError
