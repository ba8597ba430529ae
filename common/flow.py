"""Flow matching (rectified flow), the training objective and sampler of Stable Diffusion 3.

Papers and equations:

* Liu et al. 2022, "Flow Straight and Fast" and Lipman et al. 2022, "Flow Matching for Generative Modeling":
  join data and noise by a straight line and train a network to predict the velocity along it.
* Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD 3):
  the forward process z_t = (1 - t) z_0 + t eps                      (eq. 3 with a_t = 1 - t, b_t = t)
  the velocity target dz_t/dt = eps - z_0 and the loss E ||v_theta(z_t, t) - (eps - z_0)||^2,
  the logit-normal timestep density                                                              (eq. 19)
      pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2)),
  and the resolution shift t' = shift t / (1 + (shift - 1) t)                (eq. 23, shift = sqrt(m/n))

Notation, paper -> code (the paper's t in [0, 1] is diffusers' "sigma"; diffusers' "timestep" is 1000 sigma):

    t in [0, 1]                 sigma           (0: data, 1: pure noise; DDPM's alpha_bar runs the other way)
    z_0, eps                    z0, eps
    z_t = (1 - t) z_0 + t eps   add_noise(z0, eps, sigma)
    v = eps - z_0               velocity_target(z0, eps)
    shift                       shift           (SD 3: 3.0; 1.0 is no shift)

``FlowEulerSampler`` follows diffusers' ``FlowMatchEulerDiscreteScheduler`` step for step
(tests/test_flow.py); ``common.samplers.sampler_from_diffusers("flow_euler", config, steps)`` builds it from
that scheduler's config.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

# options of FlowMatchEulerDiscreteScheduler that change the sigmas and that this course does not implement;
# a config that sets one is refused rather than sampled on a silently different schedule
_UNSUPPORTED = (
    "use_dynamic_shifting",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def shift_sigma(sigma, shift: float):
    """SD 3's timestep shift t' = shift t / (1 + (shift - 1) t): spends more of the steps at high noise.

    It fixes 0 and 1, and for shift > 1 it moves every t in between towards 1 (more noise); shift = 1 is the
    identity. Works on floats, numpy arrays and tensors."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(z0: torch.Tensor, eps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The straight path z_t = (1 - t) z_0 + t eps; a (B,) sigma is broadcast per batch item."""
    sigma = torch.as_tensor(sigma, dtype=z0.dtype, device=z0.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (z0.ndim - 1)))  # (B, 1, ..., 1)
    return (1 - sigma) * z0 + sigma * eps


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d z_t / d t = eps - z_0: the same at every t, because the path is straight."""
    return eps - z0


def sample_sigmas_logit_normal(
    batch: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2): SD 3's training timesteps (eq. 19), favouring the middle of [0, 1].

    Draws exactly what diffusers' ``compute_density_for_timestep_sampling("logit_normal", ...)`` draws; on the
    generator's device (a training loop's CUDA generator draws on the GPU)."""
    device = generator.device if generator is not None else None
    u = torch.normal(mean=mean, std=std, size=(batch,), generator=generator, device=device)
    return torch.sigmoid(u)


def logit_normal_density(sigma: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """pi_ln(t; m, s) of eq. 19: the density of sigmoid(N(m, s^2)) at t (change of variables u = logit t)."""
    logit = torch.log(sigma / (1 - sigma))
    gaussian = torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * (2 * torch.pi) ** 0.5)
    return gaussian / (sigma * (1 - sigma))  # times |d logit(t) / dt|


class FlowSchedule:
    """The flow-matching "schedule": the number of training timesteps and the shift; nothing else to store."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0 (1.0: no shift, SD 3: 3.0), got {shift}")
        self.num_train_timesteps = num_train_timesteps  # T: diffusers' timestep is T * sigma
        self.shift = shift

    @classmethod
    def from_diffusers(cls, config: Mapping) -> FlowSchedule:
        """A ``FlowMatchEulerDiscreteScheduler`` config; an option that changes the sigmas and that the course
        does not implement (dynamic shifting, Karras sigmas, ...) is refused, never silently ignored."""
        for key in _UNSUPPORTED:
            if config.get(key):
                raise ValueError(
                    f"flow_euler does not implement {key}={config[key]!r}; expected it unset or False"
                )
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)))

    def to_diffusers(self) -> dict:
        """Keyword arguments of ``FlowMatchEulerDiscreteScheduler`` that give this schedule."""
        return {"num_train_timesteps": self.num_train_timesteps, "shift": self.shift}

    @property
    def prediction_type(self) -> str:
        return "flow"  # the network predicts the velocity eps - z_0

    def sigma_of(self, t: float | torch.Tensor) -> float:
        """sigma = t / T for one of the sampler's timesteps."""
        return float(t) / self.num_train_timesteps

    def predict_x0(
        self, model_output: torch.Tensor, z: torch.Tensor, t: float | torch.Tensor
    ) -> torch.Tensor:
        """x0 = z_t - t v: walk the straight line back to t = 0 (the velocity is constant along it)."""
        return z - self.sigma_of(t) * model_output

    def __repr__(self) -> str:
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, shift={self.shift})"


class FlowEulerSampler:
    """Euler's method on the flow ODE dz/dt = v_theta(z, t), from t = 1 (noise) down to t = 0 (data).

    Same interface as the samplers in ``common.samplers``: ``timesteps`` (descending floats, 1000 t),
    ``init_noise_sigma``, ``reset()``, ``step(model_output, t, z)``; so ``sample_loop`` runs it unchanged.
    """

    name = "flow_euler"
    init_noise_sigma = 1.0  # z_1 = eps ~ N(0, I)

    def __init__(self, schedule: FlowSchedule, num_inference_steps: int = 28):
        T = schedule.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} must be an int between 1 and "
                f"num_train_timesteps={T}"
            )
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        # as diffusers: the training grid t = 1/T .. 1, shifted, gives t_min; n points evenly from 1 to t_min,
        # then shifted (so the low end is shifted twice, as in diffusers), and a final t = 0
        grid = torch.linspace(1, T, T, dtype=torch.float32) / T
        sigma_min = shift_sigma(grid[0], schedule.shift).item()
        sigmas = np.linspace(1.0 * T, sigma_min * T, num_inference_steps) / T
        sigmas = torch.from_numpy(shift_sigma(sigmas, schedule.shift)).float()
        self.timesteps = sigmas * T  # float timesteps, what the transformer is conditioned on
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])  # (steps + 1,): the last step lands on t = 0
        self.reset()

    @classmethod
    def from_diffusers(cls, config: Mapping, num_inference_steps: int) -> FlowEulerSampler:
        """What ``FlowMatchEulerDiscreteScheduler.from_config(config)`` is after ``set_timesteps(steps)``."""
        return cls(FlowSchedule.from_diffusers(config), num_inference_steps)

    @property
    def prediction_type(self) -> str:
        return "flow"  # the network predicts the velocity eps - z_0

    def reset(self) -> None:
        """Nothing to forget: each Euler step needs only the current t (kept for the shared interface)."""

    def index_of(self, t: float | torch.Tensor) -> int:
        hits = (self.timesteps - float(t)).abs() < 1e-4
        if not hits.any():
            raise ValueError(
                f"timestep {float(t)} is not one of this sampler's timesteps {self.timesteps.tolist()}"
            )
        return int(hits.nonzero()[0])

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Noise a clean latent to the sampler's timestep t (img2img starts from here)."""
        return add_noise(z0, eps, self.sigmas[self.index_of(t)])

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | int | None = None,
    ) -> torch.Tensor:
        """One Euler step z_{t_next} = z_t + (t_next - t) v_theta(z_t, t); ``generator`` is unused.

        t_next < t, so the step moves against the velocity eps - z_0: away from the noise, to the data."""
        i = self.index_of(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        z_next = z.float() + (sigma_next - sigma) * model_output.float()  # in float32, as diffusers
        return z_next.to(model_output.dtype)

    def __repr__(self) -> str:
        return f"FlowEulerSampler(steps={self.num_inference_steps}, shift={self.schedule.shift})"
