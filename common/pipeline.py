"""The Stable Diffusion pipeline: text in, image out (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3 and fig. 3), with classifier-free guidance
(Ho & Salimans 2022, eq. 6).

    prompt --tokenizer--> ids (B, N_k) --text encoder tau--> context c (B, N_k, D_c)
    z_T ~ N(0, I) (B, 4, H/f, W/f) * init_noise_sigma
    for t in sampler.timesteps:                              (DDIM, DDPM or DPM-Solver++(2M), common/samplers)
        eps_u, eps_c = unet([z_t, z_t], t, [c_neg, c])       one batched call, diffusers' order [uncond, cond]
        eps = eps_u + s (eps_c - eps_u)                      classifier-free guidance, guidance scale s
        z_{t_prev} = sampler.step(eps, t, z_t)
    x = D(z_0 / scaling_factor);  image = (x / 2 + 0.5).clamp(0, 1)

Everything follows diffusers' ``StableDiffusionPipeline`` step for step (the latents are drawn with the same
generator calls, so the same seed gives the same image: tests/test_pipeline.py checks it within 1/255), plus:

* img2img (Meng et al. 2022, "SDEdit"): encode the image, noise it to the timestep that ``strength`` picks,
  denoise from there (diffusers' ``StableDiffusionImg2ImgPipeline``);
* inpainting with a base model by latent blending (Lugmayr et al. 2022, "RePaint"; Avrahami et al. 2023,
  "Blended Latent Diffusion"): after every step the known region is replaced by the original latents noised
  to the new noise level, so only the masked region (white in ``mask_image``) is generated;
* attention-map capture (Hertz et al. 2022, "Prompt-to-Prompt"): which words each pixel looked at;
* flow-matching models (SD 3's objective, ``common/flow.py``): with a ``FlowSchedule`` the UNet predicts the
  velocity eps - z_0 at timestep 1000 t, the one sampler is ``flow_euler``, and guidance mixes the two
  velocities with the same formula (eq. 6 is linear in the network's output, whatever it predicts).

Loading and saving: ``StableDiffusion.from_pretrained`` reads a diffusers folder or a single-file SD 1.x
checkpoint (``common/single_file.py``); ``save_pretrained`` writes a folder diffusers itself loads.
Shapes: B images, N_k tokens, D_c context width, f the VAE's downsampling factor, h = H / f, w = W / f.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.attention import attention_maps_to_image, capture_attention_maps
from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.flow import FlowEulerSampler, FlowSchedule
from common.pipeline_io import load_pipeline, save_pipeline
from common.runtime import get_device
from common.samplers import SAMPLERS, Sampler, as_generator, randn
from common.schedules import NoiseSchedule
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.tokenizer import ShapesTokenizer
from common.unet import UNet, UNetConfig
from common.weights import count_parameters

OUTPUT_TYPES = ("pil", "pt", "latent")
# SD 1.x's scheduler options (stable-diffusion-v1-5 scheduler/scheduler_config.json): what a pipeline built
# from parts uses, written to scheduler_config.json by save_pretrained so diffusers samples the same way
SD_SAMPLER_OPTIONS = {
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
SAMPLER_NAMES = (*SAMPLERS, "flow_euler")  # flow_euler: for flow-matching models (a FlowSchedule) only
COURSE_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "course_t2i"


@dataclass
class PipelineOutput:
    images: list | torch.Tensor  # PIL images, or (B, 3, H, W) in [0, 1] ("pt"), or latents z_0 (B, 4, h, w)
    attention_maps: torch.Tensor | None = (
        None  # (B, N_k, H, W): cross-attention per token, averaged over steps
    )
    tokens: list[list[str]] | None = None  # the token strings the maps' N_k axis stands for, per prompt


def main_model_path() -> Path:
    """The shipped course model (``checkpoints/course_t2i``, written by 06's train_text_to_image.py)."""
    if not (COURSE_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the course model is not at {COURSE_MODEL} (no model_index.json there): train it with "
            "`python 06_stable_diffusion_architecture/train_text_to_image.py`, or pass --model PATH"
        )
    return COURSE_MODEL


class StableDiffusion:
    """Tokenizer + text encoder + UNet + VAE + sampler, called like diffusers' pipelines."""

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet,
        vae: AutoencoderKL,
        schedule: NoiseSchedule | FlowSchedule | None = None,
        sampler: str = "ddim",
        device=None,
        dtype: torch.dtype = torch.float32,
        sampler_options: dict | None = None,
    ):
        self.schedule = schedule or NoiseSchedule.sd15()
        self._check_sampler(sampler)
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"the UNet's cross_attention_dim ({unet.config.cross_attention_dim}) must equal the text "
                f"encoder's hidden_size ({text_encoder.config.hidden_size})"
            )
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"the UNet's in_channels ({unet.config.in_channels}) must equal the VAE's "
                f"latent_channels ({vae.config.latent_channels})"
            )
        if tokenizer.context_length > text_encoder.config.max_position_embeddings:
            raise ValueError(
                f"the tokenizer's context_length ({tokenizer.context_length}) exceeds the text encoder's "
                f"max_position_embeddings ({text_encoder.config.max_position_embeddings})"
            )
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.sampler_name = sampler
        # options of the samplers (spacing, steps_offset, ...) in diffusers' names, as a scheduler config
        # holds them; a flow model has none (its shift lives in the FlowSchedule)
        default_options = {} if self.is_flow else SD_SAMPLER_OPTIONS
        self.sampler_options = dict(default_options if sampler_options is None else sampler_options)
        self.to(device, dtype)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Move the three modules (and put them in eval mode); None keeps the current device / dtype."""
        self.device = get_device(device) if device is not None or not hasattr(self, "device") else self.device
        self.dtype = dtype or getattr(self, "dtype", torch.float32)
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=self.device, dtype=self.dtype).eval()
        return self

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of the VAE's factor f (8 for SD); the UNet takes any latent size."""
        return self.vae_scale_factor

    @property
    def is_flow(self) -> bool:
        """True for a flow-matching model: the UNet predicts the velocity eps - z_0 (``common/flow.py``)."""
        return isinstance(self.schedule, FlowSchedule)

    def _check_sampler(self, name: str) -> None:
        """A known sampler that fits the model: flow_euler for a flow model, the others for diffusion."""
        if name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        if self.is_flow and name != "flow_euler":
            raise ValueError(
                f"this is a flow-matching model (it predicts a velocity); sampler {name!r} "
                "expects a diffusion model: use 'flow_euler'"
            )
        if not self.is_flow and name == "flow_euler":
            raise ValueError(
                f"flow_euler samples flow-matching models; this model predicts "
                f"{self.schedule.prediction_type!r}: use one of {', '.join(SAMPLERS)}"
            )

    def make_sampler(
        self, name: str | None = None, num_inference_steps: int = 50, eta: float = 0.0
    ) -> Sampler | FlowEulerSampler:
        """The named sampler (default: the pipeline's) with this pipeline's schedule and options."""
        name = name or self.sampler_name
        self._check_sampler(name)
        if name == "flow_euler":
            if eta != 0.0:
                raise ValueError(f"eta={eta} is an option of the 'ddim' sampler only; got sampler {name!r}")
            return FlowEulerSampler(self.schedule, num_inference_steps)
        cls = SAMPLERS[name]
        # an option the config leaves out means diffusers' default for that scheduler
        # class, as from_config reads it
        options = {
            key: default if self.sampler_options.get(key) is None else self.sampler_options[key]
            for key, default in cls.diffusers_defaults.items()
        }
        if name == "ddim":
            options["eta"] = eta
        elif eta != 0.0:
            raise ValueError(f"eta={eta} is an option of the 'ddim' sampler only; got sampler {name!r}")
        return cls(self.schedule, num_inference_steps, **options)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Token ids -> the text encoder's last hidden state: the context c
        (B, N_k, D_c) the UNet attends to."""
        ids = self.tokenizer(prompts).to(self.device)  # (B, N_k); warns naming the words it drops
        return self.text_encoder(ids).last_hidden_state  # (B, N_k, D_c)

    def token_strings(self, prompt: str) -> list[str]:
        """The prompt's tokens as strings, one per context position (what an attention
        map's N_k axis means)."""
        ids = self.tokenizer([prompt])[0].tolist()
        return [
            self.tokenizer.decode([i])
            or {
                self.tokenizer.bos_id: "<bos>",
                self.tokenizer.eos_id: "<eos>",
                self.tokenizer.pad_id: "<pad>",
            }.get(i, "?")
            for i in ids
        ]

    # --- inputs ---------------------------------------------------------------------------------------
    def _image_tensor(self, image, what: str = "image", channels: int = 3) -> torch.Tensor:
        """A PIL image (or list), an array (H, W[, C]) or a tensor ([B,] C, H, W) in [0, 1]
        -> (B, C, H, W) float."""
        from PIL import Image

        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
            mode = "RGB" if channels == 3 else "L"
            arrays = [np.array(im.convert(mode)).astype(np.float32) / 255.0 for im in image]
            if len({a.shape for a in arrays}) > 1:
                raise ValueError(f"every {what} in the list must have the same size")
            x = torch.from_numpy(np.stack(arrays))  # (B, H, W[, C])
            x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            x = torch.as_tensor(image).float()
            if x.ndim == 2:
                x = x[None, None]
            elif x.ndim == 3:
                x = x[None]
        else:
            raise ValueError(
                f"{what} must be a PIL image, a list of them, or a tensor in [0, 1]; "
                f"got {type(image).__name__}"
            )
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"{what} must have {channels} channel(s), shape ([B,] {channels}, H, W); got {tuple(x.shape)}"
            )
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{what} values must lie in [0, 1]; got [{x.min():.3g}, {x.max():.3g}]")
        return x

    def _check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if (
            not (isinstance(height, int) and isinstance(width, int))
            or height <= 0
            or width <= 0
            or height % m
            or width % m
        ):
            raise ValueError(
                f"height and width must be positive multiples of {m} (the VAE's downsampling factor); "
                f"got {height} x {width}"
            )

    def _check_prompts(self, prompt, negative_prompt) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompt is an empty list; expected at least one prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)  # the unconditional prompt of classifier-free guidance
        else:
            negatives = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
                raise ValueError(
                    f"negative_prompt must be a str or a list of {len(prompts)} str (one per prompt)"
                )
        return list(prompts), negatives

    # --- the pipeline ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator=None,
        output_type: str = "pil",
        sampler: str | None = None,
        eta: float = 0.0,
        image=None,
        strength: float = 0.8,
        mask_image=None,
        capture_attention: bool = False,
        progress: bool = True,
    ) -> PipelineOutput:
        """Generate images; ``image`` turns on img2img, ``image`` + ``mask_image``
        inpainting (white = repaint)."""
        # 1. check the inputs
        prompts, negatives = self._check_prompts(prompt, negative_prompt)
        B = len(prompts)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}"
            )
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1] (0: keep the image, 1: ignore it), got {strength}")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: inpainting repaints the masked part of an image")
        x_init = None
        if image is not None:
            x_init = self._image_tensor(image)  # (B_img, 3, H, W) in [0, 1]
            H_img, W_img = x_init.shape[-2:]
            if (height or H_img) != H_img or (width or W_img) != W_img:
                raise ValueError(
                    f"height x width {height} x {width} differ from the image's {H_img} x {W_img}; "
                    "leave them out with an image"
                )
            height, width = H_img, W_img
            if x_init.shape[0] not in (1, B):
                raise ValueError(f"got {x_init.shape[0]} images for {B} prompts; expected 1 or {B}")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_size(height, width)
        generator = as_generator(generator)
        sampler_ = self.make_sampler(sampler, num_inference_steps, eta)
        do_cfg = guidance_scale > 1.0  # as diffusers: s <= 1 runs the conditional model only

        # 2. the context c (B, N_k, D_c); with guidance [c_neg, c] in one batch of 2B (diffusers' order),
        # encoded in one text-encoder call (diffusers makes two: one per half)
        context = self.encode_prompt(negatives + prompts if do_cfg else prompts)  # (2B or B, N_k, D_c)

        # 3. the starting latents and the timesteps to visit
        h, w = height // f, width // f
        shape = (B, self.vae.config.latent_channels, h, w)
        timesteps = sampler_.timesteps
        z0 = noise = keep = None
        if x_init is None:  # text-to-image: z_T ~ N(0, I), drawn as diffusers' prepare_latents draws it
            z = (
                randn(shape, generator, torch.empty(0, device=self.device, dtype=self.dtype))
                * sampler_.init_noise_sigma
            )
        else:  # img2img: skip the first (1 - strength) of the steps (diffusers' get_timesteps)
            n_init = min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = timesteps[num_inference_steps - n_init :]
            x = (2 * x_init - 1).to(self.device, self.dtype)  # (B_img, 3, H, W) in [-1, 1]
            z0 = (
                self.vae.encode(x).sample(generator) * self.vae.config.scaling_factor
            )  # as diffusers' retrieve_latents
            z0 = z0.expand(B, -1, -1, -1) if z0.shape[0] == 1 else z0  # (B, 4, h, w)
            noise = randn(z0.shape, generator, z0)
            z = sampler_.add_noise(z0, noise, timesteps[0]) if len(timesteps) else z0
            if mask_image is not None:
                keep = 1 - self._latent_mask(
                    mask_image, (height, width), (h, w)
                )  # (1 or B, 1, h, w): 1 = known

        # 4. the denoising loop
        sampler_.reset()
        maps_sum = None
        capture = capture_attention_maps(self.unet) if capture_attention else _NoCapture()
        with capture as maps:
            for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
                z_in = torch.cat([z, z]) if do_cfg else z  # (2B or B, 4, h, w)
                out = self.unet(z_in, t, context)
                if do_cfg:
                    out_u, out_c = out.chunk(2)
                    out = out_u + guidance_scale * (out_c - out_u)  # classifier-free guidance (eq. 6)
                z = sampler_.step(out, t, z, generator=generator)
                if keep is not None:  # latent blending: the known region at the new noise level
                    known = sampler_.add_noise(z0, noise, timesteps[i + 1]) if i + 1 < len(timesteps) else z0
                    z = keep * known + (1 - keep) * z
                if capture_attention:
                    step_maps = attention_maps_to_image(maps, (h, w))  # (2B or B, N_k, h, w)
                    step_maps = step_maps[-B:]  # the conditional half
                    maps_sum = step_maps if maps_sum is None else maps_sum + step_maps
                    for calls in maps.values():
                        calls.clear()  # keep memory flat: one step's maps at a time

        # 5. decode and convert, as diffusers' VaeImageProcessor.postprocess
        attention = None
        if maps_sum is not None:
            attention = F.interpolate(
                maps_sum / len(timesteps), size=(height, width), mode="bilinear", align_corners=False
            ).cpu()  # (B, N_k, H, W)
        tokens = [self.token_strings(p) for p in prompts] if capture_attention else None
        if output_type == "latent":
            return PipelineOutput(z, attention, tokens)
        x = self.vae.decode(z / self.vae.config.scaling_factor)  # (B, 3, H, W) in about [-1, 1]
        x = (x / 2 + 0.5).clamp(0, 1).float().cpu()
        if output_type == "pt":
            return PipelineOutput(x, attention, tokens)
        return PipelineOutput(to_pil(x), attention, tokens)

    def _latent_mask(
        self, mask_image, image_size: tuple[int, int], latent_size: tuple[int, int]
    ) -> torch.Tensor:
        """The repaint mask at latent size (1 or B, 1, h, w): a latent cell is repainted if
        any of its pixels is."""
        m = self._image_tensor(mask_image, "mask_image", channels=1)
        if tuple(m.shape[-2:]) != tuple(image_size):
            raise ValueError(
                f"mask_image is {m.shape[-2]} x {m.shape[-1]} but the image is "
                f"{image_size[0]} x {image_size[1]}; expected the same size"
            )
        m = (m > 0.5).float()
        return F.adaptive_max_pool2d(m, latent_size).to(self.device, self.dtype)

    # --- loading and saving (common/pipeline_io.py, common/single_file.py) -----------------------------
    @classmethod
    def from_pretrained(
        cls,
        path,
        device=None,
        dtype: torch.dtype | None = None,
        *,
        sampler: str | None = None,
        tokenizer_path=None,
        config_dir=None,
    ) -> StableDiffusion:
        """A diffusers-format folder, or a single-file SD 1.x checkpoint (.safetensors, CompVis key names).

        For a single file the CLIP tokenizer comes from ``tokenizer_path`` (a local ``tokenizer/`` folder) and
        the parts' configs are SD 1.5's, or those of the diffusers folder ``config_dir`` when given.
        """
        return load_pipeline(
            cls,
            path,
            device=device,
            dtype=dtype,
            sampler=sampler,
            tokenizer_path=tokenizer_path,
            config_dir=config_dir,
        )

    def save_pretrained(self, path, overwrite: bool = False) -> Path:
        """Write a diffusers-format folder that this class and diffusers' StableDiffusionPipeline both load.

        A folder that holds files the course did not write is refused unless ``overwrite`` (which writes over
        same-named files only); a previous ``save_pretrained`` folder is replaced file by file.
        """
        return save_pipeline(self, path, overwrite=overwrite)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{name}={count_parameters(m) / 1e6:.2f}M"
            for name, m in (("text_encoder", self.text_encoder), ("unet", self.unet), ("vae", self.vae))
        )
        return (
            f"StableDiffusion({parts}, tokenizer={type(self.tokenizer).__name__}, "
            f"sampler={self.sampler_name}, device={self.device}, dtype={self.dtype})"
        )


class _NoCapture:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil: (x * 255).round()."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arrays]


def tiny_random_pipeline(seed: int = 0, sampler: str = "ddim") -> StableDiffusion:
    """A random, untrained pipeline of the course's kind (Shapes tokenizer, tiny CLIP, UNet and VAE): it runs
    in a fraction of a second, so tests and exercise checks can exercise every code path
    without a trained model."""
    torch.manual_seed(seed)
    tok = ShapesTokenizer.for_shapes()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    )
    unet = UNet(UNetConfig.tiny())
    with torch.no_grad():  # a visible output scale, so guidance and samplers change the image measurably
        unet.conv_out.weight.normal_(0, 0.05)
    return StableDiffusion(
        tokenizer=tok,
        text_encoder=text,
        unet=unet,
        vae=AutoencoderKL(AutoencoderConfig.tiny()),
        sampler=sampler,
        device="cpu",
    )
