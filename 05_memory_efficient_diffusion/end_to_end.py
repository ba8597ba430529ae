"""Chapter 05's end-to-end row: one whole text-to-image call, the course's pipeline against diffusers'.

What a learner waits for is not one module but the whole call: tokenize and encode the prompt and the empty
prompt (classifier-free guidance), run the UNet once per step on the batch [uncond, cond], step the sampler
(DPM-Solver++(2M)), decode the latents with the VAE. Both pipelines are built from the same random weights
(the SD 1.5 configurations: UNet 860 M, VAE 84 M, CLIP ViT-L/14 text tower 123 M parameters) and the same
scheduler settings, draw the same starting noise from the same seed, and must give the same image within
1/255. Real SD weights change neither time nor memory, so none are needed; the tokenizer is a small local
CLIP BPE vocabulary (what CLIPTokenizer needs to run), which only changes which ids the prompt gets.

Timing: a warm-up call on each side (its image is the one compared), then ``repeats`` calls per side,
interleaved (ours, diffusers, diffusers, ours, ...), so a load that comes and goes on the machine falls on
both sides alike; the table reports each side's median and the ratio ours / diffusers. Timers around the
text encoder, every UNet call and the VAE decode say where the time of one image goes: on a CPU in the
timed calls themselves (the breakdown kept is the last one's), on a GPU in one more call per side (there the
timers synchronise the device, which would slow the timed calls).

Settings: ``fp32`` (both sides fp32), ``fp16`` (both sides' weights and activations in fp16), ``compile``
(fp16, the UNet in channels_last and compiled with ``torch.compile``; the one-off compile time is reported
apart from the steady time). On a CPU only ``fp32`` is meaningful (fp16 kernels there are slow emulations).

    python 05_memory_efficient_diffusion/benchmark.py --end-to-end --steps 2 --out DIR           # CPU, 512 px
    python 05_memory_efficient_diffusion/benchmark.py --end-to-end --device cuda --steps 50 \
        --settings fp32 fp16 compile --out DIR                                                   # one GPU
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"
SETTINGS = ("fp32", "fp16", "compile")
TOL = 1 / 255  # one step of an 8-bit image
# SD 1.x's scheduler (stable-diffusion-v1-5 scheduler_config.json) as a DPM-Solver++(2M), as diffusers' docs
# swap it in: the same betas and the "leading" spacing with steps_offset 1
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    algorithm_type="dpmsolver++",
    solver_order=2,
)


def configs(quick: bool):
    """(UNetConfig, AutoencoderConfig, CLIPTextConfig): SD 1.5's, or tiny ones with the same block types."""
    from common.autoencoder import AutoencoderConfig
    from common.text_encoder import CLIPTextConfig
    from common.unet import UNetConfig

    if quick:
        return (
            UNetConfig.tiny(),
            AutoencoderConfig.tiny(),
            CLIPTextConfig(
                vocab_size=99,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
        )
    return UNetConfig.sd15(), AutoencoderConfig.sd15(), CLIPTextConfig.vit_l14()


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer on a small local BPE vocabulary: every lower-case letter, end-of-word
    forms, two merges, and CLIP's two special tokens. Enough to tokenize any lower-case
    prompt without a download."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["!", '"'] + list(letters) + [c + "</w>" for c in letters] + ["th", "the</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build_pipelines(
    *, quick: bool, device: str | torch.device = "cpu", seed: int = 0, tmp: Path | None = None
):
    """The course's ``StableDiffusion`` and diffusers' ``StableDiffusionPipeline`` with
    the same random weights.

    The UNet and the VAE share their weight tensors between the two sides (diffusers' modules are built empty
    and take ours with ``assign=True``); the text encoder is copied into transformers' ``CLIPTextModel``.
    Both are on ``device`` in fp32; ``set_precision`` moves them to another setting.
    """
    import diffusers
    from accelerate import init_empty_weights

    from common.autoencoder import AutoencoderKL
    from common.convert import to_transformers, unet_config_to_diffusers
    from common.pipeline import StableDiffusion
    from common.text_encoder import CLIPTextModel
    from common.tokenizer import ClipTokenizer
    from common.unet import UNet

    unet_cfg, vae_cfg, text_cfg = configs(quick)
    hf_tokenizer = clip_tokenizer(Path(tmp or tempfile.mkdtemp()) / "tokenizer")
    # the special ids the tokenizer gave <|startoftext|> / <|endoftext|>: the text model pools at eos
    text_cfg = type(text_cfg)(
        **{
            **text_cfg.to_transformers(),
            "bos_token_id": hf_tokenizer.bos_token_id,
            "eos_token_id": hf_tokenizer.eos_token_id,
            "pad_token_id": 1,
        }
    )
    init = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    torch.manual_seed(seed)
    with init:  # on a GPU the 1 G random numbers are drawn there: seconds instead of a minute
        text_encoder, unet, vae = CLIPTextModel(text_cfg), UNet(unet_cfg), AutoencoderKL(vae_cfg)
    if quick:
        with torch.no_grad():  # a visible output scale, so the sampler moves the latents measurably
            unet.conv_out.weight.normal_(0, 0.05)
    with init_empty_weights():
        ref_unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg))
        ref_vae = diffusers.AutoencoderKL(**vae_cfg.to_diffusers())
    ref_unet.load_state_dict(unet.state_dict(), strict=True, assign=True)
    ref_vae.load_state_dict(vae.state_dict(), strict=True, assign=True)
    scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULER)
    ref = diffusers.StableDiffusionPipeline(
        vae=ref_vae.eval(),
        text_encoder=to_transformers(text_encoder),
        tokenizer=hf_tokenizer,
        unet=ref_unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusion(
        tokenizer=ClipTokenizer(hf_tokenizer),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        sampler="dpmpp_2m",
        sampler_options=dict(scheduler.config),
        device=device,
    )
    return ours, ref


def set_precision(ours, ref, setting: str) -> None:
    """Put both pipelines in ``setting`` (one of ``SETTINGS``), in place."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    dtype = torch.float32 if setting == "fp32" else torch.float16
    ours.to(dtype=dtype)
    ref.to(dtype=dtype)
    if setting == "compile":
        # diffusers' recipe (docs, "torch.compile"): the UNet in channels_last, then
        # compiled; the same for ours
        for pipe in (ours, ref):
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet)


def generate(side: str, pipe, *, steps: int, image_side: int, seed: int = 0, guidance_scale: float = 7.5):
    """One image (1, 3, H, W) in [0, 1] from the prompt, the seed and the steps, with either pipeline."""
    if side == "ours":
        return pipe(
            PROMPT,
            height=image_side,
            width=image_side,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=seed,
            output_type="pt",
            progress=False,
        ).images
    # diffusers draws z_T with a CPU generator and moves it to the device, as ours does with a seed
    return pipe(
        PROMPT,
        height=image_side,
        width=image_side,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage_timers(pipe, device: torch.device):
    """Time every text-encoder call, UNet call and VAE decode of ``pipe`` (ours or diffusers').

    Forward hooks on the text encoder and the UNet, a wrapper around ``vae.decode`` (a method, not a forward).
    Yields a list that fills with (stage, seconds) in call order; the GPU is synchronised around each stage.
    """
    log: list[tuple[str, float]] = []
    handles, started = [], {}

    def pre(name):
        def hook(module, args, kwargs=None):
            _sync(device)
            started[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(module, args, out):
            _sync(device)
            log.append((name, time.perf_counter() - started[name]))

        return hook

    for name, module in (("text encoder", pipe.text_encoder), ("UNet", pipe.unet)):
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = decode(*args, **kwargs)
        _sync(device)
        log.append(("VAE decode", time.perf_counter() - t0))
        return out

    pipe.vae.decode = timed_decode
    try:
        yield log
    finally:
        for h in handles:
            h.remove()
        del pipe.vae.decode  # back to the class's method


def timed_call(side: str, pipe, device: torch.device, **kw) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    image = generate(side, pipe, **kw)
    _sync(device)
    return time.perf_counter() - t0, image


def _usage() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far; (0, 0.0) without ``resource``."""
    try:
        import resource
    except ImportError:  # Windows
        return 0, 0.0
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_minflt, u.ru_stime


def breakdown(side: str, pipe, device: torch.device, **kw) -> dict:
    """One instrumented call: seconds per stage, in call order, and the rest ("other": tokenizing, the
    sampler's steps, guidance arithmetic, drawing z_T, converting the image). Also the call's minor page
    faults (first touches of memory the kernel must hand out, zero-filled) and the CPU seconds spent in
    the kernel doing so and the like (``system_s``)."""
    faults0, system0 = _usage()
    with stage_timers(pipe, device) as log:
        total, _ = timed_call(side, pipe, device, **kw)
    faults1, system1 = _usage()
    stages = [{"stage": name, "s": s} for name, s in log]
    return {
        "total_s": total,
        "stages": stages,
        "other_s": total - sum(s for _, s in log),
        "page_faults": faults1 - faults0,
        "system_s": system1 - system0,
    }


def run_setting(
    ours, ref, setting: str, *, device: torch.device, steps: int, image_side: int, repeats: int, seed: int = 0
) -> dict:
    """Warm up, time ``repeats`` interleaved calls per side, check the images agree,
    time one call's stages."""
    set_precision(ours, ref, setting)
    pipes = {"ours": ours, "diffusers": ref}
    kw = dict(steps=steps, image_side=image_side, seed=seed)
    first, images = {}, {}
    for side, pipe in pipes.items():  # warm-up (and, with compile, the compilation), not timed
        first[side], images[side] = timed_call(side, pipe, device, **kw)
    # On a CPU the timers cost nothing (no synchronisation), so every timed call is also broken down; on a GPU
    # they would stop the CPU from queueing the next kernels ahead, so one extra call per side is broken down
    apart = device.type == "cuda"
    times = {"ours": [], "diffusers": []}
    usage = {"ours": [], "diffusers": []}  # (page faults, system s) of each timed call, on a CPU
    parts: dict[str, dict] = {}
    for i in range(repeats):
        order = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
        for side in order:
            if apart:
                times[side].append(timed_call(side, pipes[side], device, **kw)[0])
            else:
                parts[side] = breakdown(side, pipes[side], device, **kw)
                times[side].append(parts[side]["total_s"])
                usage[side].append((parts[side]["page_faults"], parts[side]["system_s"]))
    med = {side: statistics.median(ts) for side, ts in times.items()}
    diff = float((images["ours"].float() - images["diffusers"].float()).abs().max())
    row = {
        "setting": setting,
        "steps": steps,
        "side_px": image_side,
        "repeats": repeats,
        "ours_s": med["ours"],
        "diffusers_s": med["diffusers"],
        "time_ratio": med["ours"] / med["diffusers"],
        "ours_times": times["ours"],
        "diffusers_times": times["diffusers"],
        "max_abs_diff": diff,
        "same_image": diff <= TOL,
        "image_std": float(images["ours"].float().std()),
    }
    for side, calls in usage.items():
        if calls:
            row[f"{side}_page_faults"] = statistics.median(f for f, _ in calls)
            row[f"{side}_system_s"] = statistics.median(t for _, t in calls)
    if setting == "compile":  # the first call compiled: its excess over a steady call is the compile time
        row["ours_compile_s"] = first["ours"] - med["ours"]
        row["diffusers_compile_s"] = first["diffusers"] - med["diffusers"]
    for side, pipe in pipes.items():  # on a CPU: the last timed call's
        row[f"{side}_breakdown"] = breakdown(side, pipe, device, **kw) if apart else parts[side]
    return row


def summarize_breakdown(b: dict) -> dict:
    """Stage sums: text encoder (both prompts), UNet (all calls), VAE decode, other; and the UNet calls."""
    unet = [s["s"] for s in b["stages"] if s["stage"] == "UNet"]
    text = sum(s["s"] for s in b["stages"] if s["stage"] == "text encoder")
    decode = sum(s["s"] for s in b["stages"] if s["stage"] == "VAE decode")
    return {
        "text_encoder_s": text,
        "unet_s": sum(unet),
        "unet_calls": unet,
        "decode_s": decode,
        "other_s": b["other_s"],
        "total_s": b["total_s"],
    }


COLUMNS = [
    "setting",
    "steps",
    "side_px",
    "repeats",
    "ours_s",
    "diffusers_s",
    "time_ratio",
    "max_abs_diff",
    "same_image",
    "ours_compile_s",
    "diffusers_compile_s",
    "ours_text_s",
    "ours_unet_s",
    "ours_unet_call_s",
    "ours_decode_s",
    "ours_other_s",
    "diffusers_text_s",
    "diffusers_unet_s",
    "diffusers_decode_s",
    "diffusers_other_s",
    "ours_page_faults",
    "diffusers_page_faults",
    "ours_system_s",
    "diffusers_system_s",
]


def table_row(row: dict) -> dict:
    """A row of the written table: the timings, and each side's stage sums from its instrumented call."""
    out = {k: row[k] for k in COLUMNS if k in row}
    for side in ("ours", "diffusers"):
        b = summarize_breakdown(row[f"{side}_breakdown"])
        out[f"{side}_text_s"], out[f"{side}_unet_s"] = b["text_encoder_s"], b["unet_s"]
        out[f"{side}_decode_s"], out[f"{side}_other_s"] = b["decode_s"], b["other_s"]
        if side == "ours":
            out["ours_unet_call_s"] = statistics.median(b["unet_calls"])
    return out


def run_table(
    *,
    quick: bool,
    device: torch.device,
    settings: list[str],
    steps: int,
    image_side: int,
    repeats: int,
    seed: int = 0,
    out: Path | None = None,
    log=print,
    info: dict | None = None,
) -> list[dict]:
    """Every setting in turn (fp32, fp16, compile: each one changes both pipelines in place, so the order is
    fixed); writes ``end_to_end.json`` (everything, per-call times included, ``info`` beside them) and the
    table under ``out``."""
    from common.memory import write_table

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {SETTINGS}")
    t0 = time.perf_counter()
    ours, ref = build_pipelines(quick=quick, device=device, seed=seed)
    log(f"built both pipelines in {time.perf_counter() - t0:.0f} s")
    rows, table = [], []
    for setting in (s for s in SETTINGS if s in settings):
        t0 = time.perf_counter()
        row = run_setting(
            ours, ref, setting, device=device, steps=steps, image_side=image_side, repeats=repeats, seed=seed
        )
        rows.append(row)
        table.append(table_row(row))
        log(
            f"{setting}: ours {row['ours_s']:.2f} s, diffusers {row['diffusers_s']:.2f} s, ratio "
            f"{row['time_ratio']:.3f}, max |diff| {row['max_abs_diff']:.2e} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        if out is not None:  # rewritten after every setting: a stopped run keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            info = {
                "prompt": PROMPT,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "quick": quick,
                **(info or {}),
                "rows": rows,
            }
            (out / "end_to_end.json").write_text(json.dumps(info, indent=1))
            write_table(table, out, "end_to_end", COLUMNS)
    return rows
