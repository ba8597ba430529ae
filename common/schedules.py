"""Noise schedules and the forward process: betas, alpha_bar, noising, and the eps / x0 / v parameterisations.

Papers and equations:

* Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): the forward process
  q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)            (eq. 4)
  so z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, and the simple loss ||eps -
  eps_theta(z_t, t)||^2 (eq. 14); x0 from a noise prediction (eq. 15).
* Nichol & Dhariwal 2021, "Improved DDPM": the cosine schedule alpha_bar(t) = f(t) / f(0),
  f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, betas capped at 0.999
  (eq. 17; diffusers calls it "squaredcos_cap_v2").
* Salimans & Ho 2022, "Progressive Distillation" (section 4): the velocity
  v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0, the target Stable Diffusion 2 (768 px) trains on.
* Rombach et al. 2022 (Stable Diffusion): the "scaled_linear" schedule,
  betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2.
* Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed" (Algorithm 1): rescale
  sqrt(alpha_bar_t) linearly so that sqrt(alpha_bar_0) is unchanged and sqrt(alpha_bar_{T-1}) = 0, i.e. the
  last training timestep is pure noise (zero terminal SNR). It needs v prediction: at alpha_bar = 0 an eps
  prediction says nothing about z_0.

Notation, paper -> code:

    T                          num_train_timesteps      (timesteps are integers 0 .. T-1, as in diffusers)
    beta_t                     betas[t]
    alpha_t = 1 - beta_t       alphas[t]
    alpha_bar_t = prod alpha   alpha_bar[t]             (diffusers' ``alphas_cumprod``: float32 cumprod too)
    SNR(t)                     alpha_bar_t / (1 - alpha_bar_t)

The numbers match diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler exactly for the same
configuration (tests/test_schedules.py checks it), so a model trained with either
library samples with the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers' names for our schedules (the cosine one is called after the GLIDE code that introduced it)
_TO_DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_FROM_DIFFUSERS_SCHEDULE = {v: k for k, v in _TO_DIFFUSERS_SCHEDULE.items()}


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """The T betas of a named schedule, float32, computed the way diffusers computes them."""
    T = num_train_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020, section 4: 1e-4 .. 0.02
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta), gentler near t = 0
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if (
        beta_schedule == "cosine"
    ):  # Nichol & Dhariwal 2021 eq. 17; computed in float64, then cast, like diffusers

        def f(u: float) -> float:  # alpha_bar as a function of u = t / T in [0, 1]
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose alpha_bar ends at exactly 0 (Lin et al. 2023, Algorithm 1), computed as diffusers does.

    With s_t = sqrt(alpha_bar_t): s'_t = (s_t - s_{T-1}) * s_0 / (s_0 - s_{T-1}), so
    s'_0 = s_0 and s'_{T-1} = 0.
    """
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s_first, s_last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - s_last) * (s_first / (s_first - s_last))  # shift, then rescale
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumprod
    return 1 - alphas


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


@dataclass
class NoiseSchedule:
    """A discrete variance-preserving noise schedule and what the model is trained to predict under it.

    ``NoiseSchedule()`` is Stable Diffusion 1.x's; ``NoiseSchedule.ddpm()`` is Ho et al.'s linear one.
    Every method taking ``t`` accepts an int, a 0-d tensor or a (B,) LongTensor (one timestep per batch item).
    """

    num_train_timesteps: int = 1000  # T: the number of noise levels the model was trained on
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES; SD 1.x and 2.x use scaled_linear
    beta_start: float = 0.00085  # beta_0 (unused by cosine); SD: 0.00085, DDPM: 1e-4
    beta_end: float = 0.012  # beta_{T-1} (unused by cosine); SD: 0.012, DDPM: 0.02
    prediction_type: str = "epsilon"  # the network's output: eps (SD 1.x), v (SD 2.x 768px) or x0 ("sample")
    rescale_zero_snr: bool = False  # Lin et al. 2023: alpha_bar_{T-1} = 0 exactly; use with v prediction
    betas: torch.Tensor = field(init=False, repr=False, compare=False)
    alphas: torch.Tensor = field(init=False, repr=False, compare=False)
    alpha_bar: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        check_prediction_type(self.prediction_type)
        self.betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.rescale_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)  # float32 cumprod, as diffusers does

    # ---- presets --------------------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> NoiseSchedule:
        """Stable Diffusion 1.x: scaled_linear 0.00085 .. 0.012, T = 1000, eps prediction."""
        return cls()

    @classmethod
    def ddpm(cls, num_train_timesteps: int = 1000) -> NoiseSchedule:
        """Ho et al. 2020: linear 1e-4 .. 0.02 (given for T = 1000), eps prediction."""
        return cls(num_train_timesteps, "linear", 1e-4, 0.02)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> NoiseSchedule:
        """Nichol & Dhariwal 2021's cosine schedule; pairs well with v prediction at low resolution."""
        return cls(num_train_timesteps, "cosine", prediction_type=prediction_type)

    # ---- diffusers interop ----------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: Mapping) -> NoiseSchedule:
        """Read a diffusers ``scheduler_config.json`` (any of its scheduler classes) or ``scheduler.config``.

        Keys that only change how a sampler steps (``timestep_spacing``, ``steps_offset``, ``clip_sample``,
        ``set_alpha_to_one``, ...) are left to the samplers; keys that would change the schedule and that this
        course does not implement are an error rather than a silently different schedule.
        """
        if config.get("trained_betas") is not None:
            raise ValueError(
                "scheduler config has explicit trained_betas; only named beta schedules are supported "
                f"({', '.join(_FROM_DIFFUSERS_SCHEDULE)})"
            )
        name = config.get("beta_schedule", "linear")
        if name not in _FROM_DIFFUSERS_SCHEDULE:
            raise ValueError(
                f"unknown diffusers beta_schedule {name!r}; "
                f"expected one of {', '.join(_FROM_DIFFUSERS_SCHEDULE)}"
            )
        # defaults are diffusers' own, so a config that omits a key means what it means to diffusers
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule=_FROM_DIFFUSERS_SCHEDULE[name],
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            prediction_type=config.get("prediction_type", "epsilon"),
            rescale_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments for any diffusers scheduler class that give this schedule."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": _TO_DIFFUSERS_SCHEDULE[self.beta_schedule],
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.rescale_zero_snr,
        }

    # ---- looking things up at t -----------------------------------------------------------------------
    def check_timesteps(self, t: int | torch.Tensor) -> torch.Tensor:
        """``t`` as a LongTensor, after checking every entry lies in [0, T-1]."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise ValueError(
                f"timesteps must be integers in [0, {self.num_train_timesteps - 1}], got dtype {t.dtype}"
            )
        t = t.long()
        if t.numel() and (t.min() < 0 or t.max() > self.num_train_timesteps - 1):
            bad = t[(t < 0) | (t > self.num_train_timesteps - 1)].flatten()[0].item()
            raise ValueError(f"timestep {bad} is outside [0, {self.num_train_timesteps - 1}]")
        return t

    def alpha_bar_at(self, t: int | torch.Tensor, like: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """alpha_bar_t on ``like``'s device and dtype, shaped to broadcast against it: (B, 1, ..., 1) or 0-d.

        ``validate=False`` skips the range check, for timesteps from ``sample_timesteps``
        (valid by construction): on a GPU the check reads t back to the host, which stalls the
        training loop once a call."""
        t = (self.check_timesteps(t) if validate else torch.as_tensor(t).long()).to(like.device)
        alpha_bar_t = self.alpha_bar.to(device=like.device, dtype=like.dtype)[t]
        if alpha_bar_t.ndim == 1:  # one t per batch item -> (B, 1, ..., 1)
            alpha_bar_t = alpha_bar_t.view(-1, *([1] * (like.ndim - 1)))
        return alpha_bar_t

    def snr(self, t: int | torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) on t's device; falls monotonically with t."""
        t = self.check_timesteps(t) if validate else torch.as_tensor(t).long()
        alpha_bar_t = self.alpha_bar.to(t.device)[t]
        return alpha_bar_t / (1 - alpha_bar_t)

    # ---- the forward process and the training targets -------------------------------------------------
    def add_noise(
        self, z0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, validate: bool = True
    ) -> torch.Tensor:
        """Sample q(z_t | z_0) (Ho et al. eq. 4): z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps."""
        alpha_bar_t = self.alpha_bar_at(t, z0, validate)
        return alpha_bar_t**0.5 * z0 + (1 - alpha_bar_t) ** 0.5 * eps

    def v_target(
        self, z0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, validate: bool = True
    ) -> torch.Tensor:
        """The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 (Salimans & Ho 2022)."""
        alpha_bar_t = self.alpha_bar_at(t, z0, validate)
        return alpha_bar_t**0.5 * eps - (1 - alpha_bar_t) ** 0.5 * z0

    def training_target(
        self, z0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, validate: bool = True
    ) -> torch.Tensor:
        """What the network should output at (z_t, t) under this schedule's prediction_type."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.v_target(z0, eps, t, validate)
        return z0

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}, one per batch item (Ho et al. Algorithm 1), drawn on
        the generator's device."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    # ---- converting between parameterisations ---------------------------------------------------------
    def eps_to_x0(self, eps: torch.Tensor, z_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (Ho et al. eq. 15)."""
        alpha_bar_t = self.alpha_bar_at(t, z_t)
        return (z_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5

    def x0_to_eps(self, x0: torch.Tensor, z_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """eps = (z_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
        alpha_bar_t = self.alpha_bar_at(t, z_t)
        return (z_t - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5

    def v_to_x0(self, v: torch.Tensor, z_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar_t) z_t - sqrt(1 - alpha_bar_t) v."""
        alpha_bar_t = self.alpha_bar_at(t, z_t)
        return alpha_bar_t**0.5 * z_t - (1 - alpha_bar_t) ** 0.5 * v

    def v_to_eps(self, v: torch.Tensor, z_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) z_t."""
        alpha_bar_t = self.alpha_bar_at(t, z_t)
        return alpha_bar_t**0.5 * v + (1 - alpha_bar_t) ** 0.5 * z_t

    def predict_x0(
        self,
        model_output: torch.Tensor,
        z_t: torch.Tensor,
        t: int | torch.Tensor,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """The clean latent the network's output implies (prediction_type defaults to the schedule's)."""
        kind = check_prediction_type(prediction_type or self.prediction_type)
        if kind == "epsilon":
            return self.eps_to_x0(model_output, z_t, t)
        if kind == "v_prediction":
            return self.v_to_x0(model_output, z_t, t)
        return model_output

    def predict_eps(
        self,
        model_output: torch.Tensor,
        z_t: torch.Tensor,
        t: int | torch.Tensor,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """The noise the network's output implies (prediction_type defaults to the schedule's)."""
        kind = check_prediction_type(prediction_type or self.prediction_type)
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return self.v_to_eps(model_output, z_t, t)
        return self.x0_to_eps(model_output, z_t, t)
