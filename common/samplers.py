"""Samplers: turn a trained noise predictor into images by running the reverse process.

* DDPM: ancestral sampling, Ho et al. 2020, eqs. 6-7 and Algorithm 2 (here on a possibly strided chain).
* DDIM: Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16; eta = 0 is deterministic, eta = 1 is DDPM-like.
* DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++", Algorithm 2: a second-order multistep solver of the
  diffusion ODE written for the data prediction x0, the default sampler of many SD front ends.
* Flow matching's Euler sampler (SD 3) lives in ``common.flow``; ``sampler_from_diffusers("flow_euler", ...)``
  builds it too.

All three follow diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler step for step (the
tests pin every step against them, 1e-5), for prediction types "epsilon", "v_prediction" and "sample". They
share one interface so a pipeline can swap them:

    sampler = make_sampler("ddim", schedule, 50)      # or DDIMSampler(schedule, 50, eta=0.0)
    z = torch.randn(shape, generator=g) * sampler.init_noise_sigma
    for t in sampler.timesteps:                        # descending LongTensor
        z = sampler.step(unet(z, t), t, z, generator=g)

or simply ``sample_loop(lambda z, t: unet(z, t), z, sampler, generator=seed)``.

Timestep spacing (Lin et al. 2023, table 2) decides which of the T training timesteps are visited:
"leading" (0, k, 2k, ... plus steps_offset; SD 1.x uses steps_offset=1), "trailing" (T-1, T-1-k, ...; reaches
the noisiest timestep) and "linspace" (evenly rounded from 0 to T-1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch

from common.flow import FlowEulerSampler
from common.schedules import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A seed becomes a CPU generator seeded with it; a generator or None passes through."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ValueError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


def randn(shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise drawn on the generator's device, then moved to ``like``'s: same
    seed, same noise anywhere."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def spaced_timesteps(T: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The visited training timesteps, descending, as diffusers' DDPM/DDIM ``set_timesteps`` makes them."""
    n = num_inference_steps
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":  # numpy's float arange, exactly as diffusers, so the rounding agrees
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}")


class Sampler:
    """What every sampler shares: the visited timesteps, noising for img2img, and the step interface."""

    name = ""
    init_noise_sigma = 1.0  # z_T ~ N(0, I) for variance-preserving samplers (Karras-style ones would differ)
    # diffusers' defaults for the options below, used when reading a scheduler config that omits them
    diffusers_defaults: dict = {"timestep_spacing": "leading", "steps_offset": 0}

    def __init__(
        self, schedule: NoiseSchedule, num_inference_steps: int, *, timestep_spacing: str, steps_offset: int
    ):
        T = schedule.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} must be an int between 1 and "
                f"num_train_timesteps={T}"
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r}; "
                f"expected one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        timesteps = self._make_timesteps()
        if timesteps.min() < 0 or timesteps.max() > T - 1:
            raise ValueError(
                f"{timestep_spacing} spacing with steps_offset={steps_offset} and num_inference_steps="
                f"{num_inference_steps} gives timesteps {timesteps.max()}..{timesteps.min()}, "
                f"outside [0, {T - 1}]; lower steps_offset or use 'trailing'"
            )
        if (np.diff(timesteps) >= 0).any():
            raise ValueError(
                f"num_inference_steps={num_inference_steps} repeats timesteps with {timestep_spacing} "
                f"spacing and num_train_timesteps={T}; use fewer steps"
            )
        self.timesteps = torch.from_numpy(timesteps.copy())  # LongTensor, descending
        self.reset()

    def _make_timesteps(self) -> np.ndarray:
        T = self.schedule.num_train_timesteps
        return spaced_timesteps(T, self.num_inference_steps, self.timestep_spacing, self.steps_offset)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def reset(self) -> None:
        """Forget any state from a previous run (multistep samplers keep past predictions)."""

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Noise a clean latent to timestep t (img2img starts the loop from here)."""
        return self.schedule.add_noise(z0, eps, t)

    def index_of(self, t: int | torch.Tensor) -> int:
        """Position of timestep t in ``self.timesteps``; a ValueError if this sampler never visits it."""
        hits = (self.timesteps == int(t)).nonzero()
        if len(hits) == 0:
            raise ValueError(
                f"timestep {int(t)} is not one of this sampler's timesteps {self.timesteps.tolist()}"
            )
        return int(hits[0])

    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | int | None = None,
    ) -> torch.Tensor:
        """z_{t_prev} from z_t and the network's output at t. An int generator seeds a fresh one for this
        step only, so a loop should pass one torch.Generator to every step (sample_loop does)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_inference_steps}, spacing={self.timestep_spacing}, "
            f"steps_offset={self.steps_offset}, prediction_type={self.prediction_type})"
        )


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(z_{t_prev} | z_t, x0_pred) (Ho et al. 2020)."""

    name = "ddpm"
    diffusers_defaults = {
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "variance_type": "fixed_small",
        "clip_sample": True,
    }

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int = 1000,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
    ):
        # steps_offset=0 by default so the full 1000-step chain of the paper (999 .. 0)
        # fits; SD uses 1 with fewer
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"unknown variance_type {variance_type!r}; expected one of fixed_small, fixed_large"
            )
        self.variance_type = (
            variance_type  # fixed_small: tilde-beta_t (diffusers' default); fixed_large: beta_t
        )
        self.clip_sample = clip_sample  # clamp x0_pred to [-1, 1]: for pixels, never for SD latents
        super().__init__(
            schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
        )

    def step(self, model_output, t, z, generator=None):
        """One ancestral step z_t -> z_{t_prev}.

        Notation, paper -> code (with skipped timesteps, alpha_t and beta_t are the
        effective one-step values):
            alpha_bar_t, alpha_bar_{t-1}      alpha_bar_t, alpha_bar_prev  (alpha_bar_prev = 1 after the end)
            alpha_t, beta_t                   alpha_t = alpha_bar_t / alpha_bar_prev, beta_t = 1 - alpha_t
            x_0 estimate                      x0_pred
            tilde-mu_t(x_t, x_0)              mean
            sigma_t^2 = tilde-beta_t          sigma_t ** 2  ("fixed_small"; beta_t for "fixed_large")
        """
        # 1. the previous timestep is the next one in the chain; past the end, alpha_bar_prev = 1 (clean data)
        i = self.index_of(t)
        is_last = i == len(self.timesteps) - 1
        alpha_bar_t = self.schedule.alpha_bar[int(t)]
        alpha_bar_prev = torch.tensor(1.0) if is_last else self.schedule.alpha_bar[int(self.timesteps[i + 1])]
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t

        # 2. predicted x_0 from the network output (eq. 15), optionally clipped
        x0_pred = self.schedule.predict_x0(model_output, z, t)
        if self.clip_sample:
            x0_pred = x0_pred.clamp(-1, 1)

        # 3. posterior mean tilde-mu_t (eq. 7)
        mean = (alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)) * x0_pred + (
            alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        ) * z

        # 4. posterior variance tilde-beta_t (eq. 7), clamped away from 0 as diffusers does
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)
        if self.variance_type == "fixed_large":
            variance = beta_t
        sigma_t = variance**0.5

        # 5. z_{t_prev} ~ N(mean, sigma_t^2 I) (eq. 6); no noise on the final step (Algorithm 2), which
        #    returns the mean. diffusers noises every t > 0, so with steps_offset=1 it also noises the last
        #    step (t = 1): by ~1e-10 for fixed_small, by sqrt(beta_t) for fixed_large
        if is_last:
            return mean
        return mean + sigma_t * randn(model_output.shape, as_generator(generator), model_output)


class DDIMSampler(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021): deterministic at eta = 0."""

    name = "ddim"
    diffusers_defaults = {
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "clip_sample": True,
    }

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int = 50,
        *,
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
    ):
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        self.eta = eta
        # alpha_bar after the last step: 1 (fully clean) or alpha_bar[0]; SD 1.x was released with False
        self.final_alpha_bar = torch.tensor(1.0) if set_alpha_to_one else schedule.alpha_bar[0]
        self.clip_sample = clip_sample  # clamp x0_pred to [-1, 1]: for pixels, never for SD latents
        super().__init__(
            schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
        )

    def step(self, model_output, t, z, generator=None):
        """One DDIM step z_t -> z_{t_prev} (Song et al. 2021 eq. 12).

        Notation, paper -> code (the DDIM paper writes alpha_t for DDPM's alpha_bar_t):
            alpha_t, alpha_{t-1}              alpha_bar_t, alpha_bar_prev
            f_theta(x_t) "predicted x_0"      x0_pred
            eps_theta(x_t)                    eps_pred
            sigma_t(eta)                      sigma_t
            "direction pointing to x_t"       dir_z_t
        """
        # 1. previous timestep: t minus the stride T // steps, as diffusers does for every spacing (so with
        #    "trailing" and T not a multiple of steps, t_prev can differ by one from
        #    the next visited timestep)
        t = int(t)
        t_prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self.schedule.alpha_bar[t]
        alpha_bar_prev = self.schedule.alpha_bar[t_prev] if t_prev >= 0 else self.final_alpha_bar

        # 2. "predicted x_0" and the noise it implies (eq. 12), optionally clipping x0_pred
        x0_pred = self.schedule.predict_x0(model_output, z, t)
        eps_pred = self.schedule.predict_eps(model_output, z, t)
        if self.clip_sample:
            x0_pred = x0_pred.clamp(-1, 1)

        # 3. sigma_t(eta) = eta sqrt((1 - alpha_prev) / (1 - alpha_t))
        #    sqrt(1 - alpha_t / alpha_prev)  (eq. 16)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = self.eta * variance**0.5

        # 4. "direction pointing to x_t" (eq. 12)
        dir_z_t = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps_pred

        # 5. z_{t_prev} = sqrt(alpha_prev) x0_pred + direction + sigma_t * noise  (eq. 12)
        z_prev = alpha_bar_prev**0.5 * x0_pred + dir_z_t
        if self.eta > 0:
            z_prev = z_prev + sigma_t * randn(model_output.shape, as_generator(generator), model_output)
        return z_prev

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta})"


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the data prediction x0.

    Stateful: it keeps the previous step's x0_pred, so call ``reset()`` before a new run (sample_loop does).
    """

    name = "dpmpp_2m"
    diffusers_defaults = {
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
    }

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int = 25,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        lower_order_final: bool = True,
        final_sigmas_type: str = "zero",
    ):
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"unknown final_sigmas_type {final_sigmas_type!r}; expected one of zero, sigma_min"
            )
        # below 15 steps, end with a first-order step: the second-order one is unstable there
        self.lower_order_final = lower_order_final
        # end at sigma = 0 (alpha_bar = 1, fully clean) or at the schedule's smallest noise alpha_bar[0]
        self.final_sigmas_type = final_sigmas_type
        if schedule.alpha_bar[-1] == 0:
            # zero terminal SNR: lambda = log(alpha / sigma) is -inf at alpha_bar = 0, so, as diffusers does,
            # this sampler works on a copy whose last alpha_bar is the smallest positive float16, 2^-24
            schedule = copy.copy(schedule)
            schedule.alpha_bar = schedule.alpha_bar.clone()
            schedule.alpha_bar[-1] = 2.0**-24
        super().__init__(
            schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
        )

    def _make_timesteps(self) -> np.ndarray:
        # diffusers' DPM-Solver spaces n + 1 points and drops the last (t = 0) for leading and linspace: the
        # final step then goes from the smallest visited t to the clean end point
        T, n = self.schedule.num_train_timesteps, self.num_inference_steps
        if self.timestep_spacing == "leading":
            return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(
                np.int64
            ) + self.steps_offset
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        return spaced_timesteps(T, n, "trailing", self.steps_offset)

    def reset(self) -> None:
        self._step_index = None  # position in self.timesteps, found from the first t this run is given
        self._x0_pred_last = None  # x_theta at the previous (noisier) timestep, for the second-order term

    def step(self, model_output, t, z, generator=None):
        """One step z_t -> z_{t_prev} of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2).
        ``generator`` is unused.

        Notation, paper -> code (sampling runs t_{i-1} -> t_i; the paper's alpha_t is sqrt(alpha_bar_t)):
            alpha_t, sigma_t                    alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
            lambda_t = log(alpha_t / sigma_t)   lambda_t (half log-SNR; +inf at the clean end point)
            x_theta(x_t, t)                     x0_pred  (x0_pred_last: the previous step's)
            h_i, h_{i-1}                        h = lambda_prev - lambda_t, h_last = lambda_t - lambda_last
            r_i = h_{i-1} / h_i                 r
            D_i                                 D
        """
        # 1. where we are: the first call of a run finds t; later calls must follow the schedule
        if self._step_index is None:
            self._step_index = self.index_of(t)
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError(f"all {i} steps of this run are done; call sampler.reset() before a new run")
        if int(t) != int(self.timesteps[i]):
            raise ValueError(
                f"expected timestep {int(self.timesteps[i])} (step {i}), got {int(t)}; "
                "call sampler.reset() before a new run"
            )
        is_last = i == len(self.timesteps) - 1

        # 2. alpha, sigma, lambda at t, at t_prev (the clean end point after the last step) and at the last t
        def alpha_sigma_lambda(alpha_bar):
            alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
            return alpha, sigma, torch.log(alpha) - torch.log(sigma)

        alpha_bar_t = self.schedule.alpha_bar[int(t)]
        if not is_last:
            alpha_bar_prev = self.schedule.alpha_bar[int(self.timesteps[i + 1])]
        else:  # sigma = 0 gives lambda = +inf and exp(-h) = 0: the step lands exactly on x0_pred
            final_zero = self.final_sigmas_type == "zero"
            alpha_bar_prev = torch.tensor(1.0) if final_zero else self.schedule.alpha_bar[0]
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(alpha_bar_t)
        alpha_prev, sigma_prev, lambda_prev = alpha_sigma_lambda(alpha_bar_prev)
        h = lambda_prev - lambda_t

        # 3. the data prediction x_theta from the network output
        x0_pred = self.schedule.predict_x0(model_output, z, t)

        # 4. first order on the first step (no history yet) and on the final step when asked for:
        #    DPM-Solver++1, the same as DDIM with eta = 0:
        #    z_prev = (sigma_prev / sigma_t) z - alpha_prev (e^{-h} - 1) x0_pred
        first_order = self._x0_pred_last is None or (
            is_last
            and (self.final_sigmas_type == "zero" or (self.lower_order_final and len(self.timesteps) < 15))
        )
        if first_order:
            D = x0_pred
        else:
            # 5. second order (Algorithm 2): D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_last
            alpha_bar_last = self.schedule.alpha_bar[int(self.timesteps[i - 1])]
            _, _, lambda_last = alpha_sigma_lambda(alpha_bar_last)
            h_last = lambda_t - lambda_last
            r = h_last / h
            D = x0_pred + 0.5 * (x0_pred - self._x0_pred_last) / r
        z_prev = (sigma_prev / sigma_t) * z.float() - (alpha_prev * (torch.exp(-h) - 1.0)) * D

        self._x0_pred_last = x0_pred
        self._step_index = i + 1
        return z_prev.to(model_output.dtype)


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
}
# the diffusers scheduler class each sampler matches step for step, and back (for scheduler_config.json files)
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}  # flow_euler: common.flow, flow models
SAMPLER_OF_SCHEDULER = {scheduler: name for name, scheduler in DIFFUSERS_SCHEDULERS.items()}


def make_sampler(name: str, schedule: NoiseSchedule, steps: int, **options) -> Sampler:
    """Build a sampler by name; ``options`` are that sampler's keyword arguments
    (a misspelt one is an error)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule, steps, **options)


def sampler_from_diffusers(name: str, config: Mapping, steps: int) -> Sampler:
    """The sampler that diffusers' matching scheduler class would be, built ``from_config(config)``.

    Reads the schedule (``NoiseSchedule.from_diffusers``) and the sampler options the config sets; options it
    omits take diffusers' defaults for that class (so DPM-Solver++ from SD 1.5's config spaces by "linspace").
    ``"flow_euler"`` is FlowMatchEulerDiscreteScheduler (SD 3): a ``common.flow.FlowEulerSampler``.
    """
    if name == "flow_euler":  # flow matching (SD 3) has no NoiseSchedule: common.flow reads its own config
        return FlowEulerSampler.from_diffusers(config, steps)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join([*SAMPLERS, 'flow_euler'])}")
    cls = SAMPLERS[name]
    options = {
        key: default if config.get(key) is None else config[key]
        for key, default in cls.diffusers_defaults.items()
    }
    return cls(NoiseSchedule.from_diffusers(config), steps, **options)


@torch.no_grad()
def sample_loop(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z_T: torch.Tensor,
    sampler: Sampler,
    generator: torch.Generator | int | None = None,
    callback: Callable | None = None,
    *,
    start_index: int = 0,
) -> torch.Tensor:
    """Run the reverse process from z_T and return z_0.

    ``denoise_fn(z, t)`` returns the network's output (eps, v or x0, per the schedule) for latents z at the
    0-d LongTensor timestep t. ``callback(i, t, z, x0_pred)`` is called after each step with the new latents
    and the x0 predicted at t, for drawing trajectories. ``start_index`` skips the first steps (img2img: start
    from ``sampler.add_noise(z0, eps, sampler.timesteps[start_index])``). An int
    ``generator`` seeds a fresh one.
    """
    generator = as_generator(generator)
    sampler.reset()
    z = z_T * sampler.init_noise_sigma if start_index == 0 else z_T  # an img2img start is already noised
    for i, t in enumerate(sampler.timesteps[start_index:], start=start_index):
        model_output = denoise_fn(z, t)
        x0_pred = sampler.schedule.predict_x0(model_output, z, t) if callback is not None else None
        z = sampler.step(model_output, t, z, generator=generator)
        if callback is not None:
            callback(i, t, z, x0_pred)
    return z
