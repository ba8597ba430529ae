"""The course pipeline against diffusers' StableDiffusionPipeline with the same (tiny, random) weights.

A tiny diffusers pipeline (2-level UNet, 2-level VAE, 2-layer CLIP text model, a CLIP BPE tokenizer from a
vocabulary the test writes) is saved to a temporary folder; the course pipeline loads it and must give the
same image for the same prompt, seed, sampler, steps and guidance (within 1/255), and the other way round.
"""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from common.autoencoder import AutoencoderConfig
from common.convert import unet_config_to_diffusers
from common.pipeline import StableDiffusion, main_model_path
from common.unet import UNetConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT, NEGATIVE = "a red circle", "blue"
SIZE, STEPS = 16, 4  # 16 px images: 8x8 latents through the f = 2 VAE; seconds on a shared 2-core CPU
TOL = 1 / 255


def write_clip_vocab(folder):
    """A character-level CLIP BPE vocabulary with two merges: enough for CLIPTokenizer to
    load and split words."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = (
        ["!", '"']
        + list(letters)
        + [c + "</w>" for c in letters]
        + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return len(tokens)


def tiny_diffusers_pipeline(folder, tmp):
    torch.manual_seed(0)
    vocab_size = write_clip_vocab(tmp / "vocab")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "vocab"), model_max_length=77)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=1,
        )
    ).eval()
    unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.tiny())).eval()
    vae = diffusers.AutoencoderKL(**AutoencoderConfig.tiny().to_diffusers()).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but give conv_out a visible scale anyway
        unet.conv_out.weight.mul_(3.0)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )  # explicit, so from_config carries it over
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a shared CPU makes more threads much slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("tiny_sd")
    ref = tiny_diffusers_pipeline(tmp / "pipe", tmp)
    ref.set_progress_bar_config(disable=True)
    return tmp / "pipe", ref


def ours_image(pipe, **kw):
    args = dict(
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=0,
        output_type="pt",
        height=SIZE,
        width=SIZE,
        progress=False,
    )
    args.update(kw)
    return pipe(PROMPT, **args).images


def ref_image(ref, **kw):
    args = dict(
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=SIZE,
        width=SIZE,
    )
    args.update(kw)
    return ref(PROMPT, **args).images


SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_loads_diffusers_folder_and_matches(tiny, sampler):
    folder, ref = tiny
    ours = StableDiffusion.from_pretrained(folder, sampler=sampler)
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    try:
        a = ours_image(ours, negative_prompt=NEGATIVE)
        b = ref_image(ref, negative_prompt=NEGATIVE)
    finally:
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    assert a.shape == b.shape == (1, 3, SIZE, SIZE)
    diff = (a - b).abs().max().item()
    print(f"{sampler}: max |ours - diffusers| = {diff:.2e}")
    assert diff <= TOL
    assert b.std() > 0.01  # a real image, not a constant


def test_ddim_eta_and_batch_match_diffusers(tiny):
    folder, ref = tiny
    ours = StableDiffusion.from_pretrained(folder)
    a = ours(
        ["a red circle", "a blue square"],
        num_inference_steps=3,
        guidance_scale=3.0,
        eta=1.0,
        generator=1,
        output_type="pt",
        height=SIZE,
        width=SIZE,
        progress=False,
    ).images
    b = ref(
        ["a red circle", "a blue square"],
        num_inference_steps=3,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
        height=SIZE,
        width=SIZE,
    ).images
    assert (a - b).abs().max().item() <= TOL


def test_pil_output_rounds_like_diffusers(tiny):
    folder, ref = tiny
    ours = StableDiffusion.from_pretrained(folder)
    a = np.asarray(ours_image(ours, output_type="pil", guidance_scale=1.0)[0]).astype(int)
    b = np.asarray(ref_image(ref, output_type="pil", guidance_scale=1.0)[0]).astype(int)
    assert a.shape == (SIZE, SIZE, 3) and np.abs(a - b).max() <= 1


def test_img2img_matches_diffusers(tiny):
    from PIL import Image

    folder, ref = tiny
    ours = StableDiffusion.from_pretrained(folder)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    a = ours(
        PROMPT, image=init, strength=0.6, num_inference_steps=5, generator=3, output_type="pt", progress=False
    ).images
    b = i2i(
        PROMPT,
        image=init,
        strength=0.6,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    diff = (a - b).abs().max().item()
    print(f"img2img: max |ours - diffusers| = {diff:.2e}")
    assert diff <= TOL


def test_strength_zero_and_inpainting_keep_the_image(tiny):
    folder, _ = tiny
    pipe = StableDiffusion.from_pretrained(folder)
    init = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    z0 = pipe.vae.encode(2 * init - 1).sample(g) * pipe.vae.config.scaling_factor
    same = pipe(PROMPT, image=init, strength=0.0, generator=5, output_type="latent", progress=False).images
    assert torch.allclose(same, z0, atol=1e-6)  # strength 0: no step, the image's own latents
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2, :] = 1  # repaint the top half, keep the bottom
    z = pipe(
        PROMPT,
        image=init,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=3,
        generator=5,
        output_type="latent",
        progress=False,
    ).images
    h = z.shape[-2]
    assert torch.allclose(
        z[..., h // 2 :, :], z0[..., h // 2 :, :], atol=1e-6
    )  # the known region is the image's
    assert (z[..., : h // 2, :] - z0[..., : h // 2, :]).abs().max() > 0.1  # the masked region was generated
    out = pipe(
        PROMPT,
        image=init,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=3,
        generator=5,
        output_type="pt",
        progress=False,
    ).images
    assert out.shape == (1, 3, SIZE, SIZE)


def test_save_pretrained_loads_in_diffusers(tmp_path):
    """The course's own kind of model (Shapes word-level tokenizer) saved by us, loaded by diffusers."""
    from common.autoencoder import AutoencoderKL
    from common.text_encoder import CLIPTextConfig, CLIPTextModel
    from common.tokenizer import ShapesTokenizer
    from common.unet import UNet

    torch.manual_seed(0)
    tok = ShapesTokenizer.for_shapes()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    )
    pipe = StableDiffusion(
        tokenizer=tok,
        text_encoder=text,
        unet=UNet(UNetConfig.tiny()),
        vae=AutoencoderKL(AutoencoderConfig.tiny()),
        sampler="dpmpp_2m",
    )
    pipe.save_pretrained(tmp_path / "course")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "course"))
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "DPMSolverMultistepScheduler"
    long_prompt = "a small red circle at the top left and a big blue square at the bottom right " * 2
    hf_ids = ref.tokenizer(
        [PROMPT, long_prompt],
        padding="max_length",
        max_length=ref.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(hf_ids, tok([PROMPT, long_prompt]))
    a = ours_image(pipe, negative_prompt="blue")
    b = ref_image(ref, negative_prompt="blue")
    diff = (a - b).abs().max().item()
    print(f"ours saved -> diffusers: max diff = {diff:.2e}")
    assert diff <= TOL
    again = StableDiffusion.from_pretrained(tmp_path / "course")
    assert (
        again.sampler_name == "dpmpp_2m" and (ours_image(again, negative_prompt="blue") - a).abs().max() == 0
    )


def test_clip_pipeline_round_trip(tiny, tmp_path):
    """A pipeline with SD's kind of tokenizer (CLIP BPE), loaded, saved by us, loaded
    by diffusers and by us."""
    folder, ref = tiny
    ours = StableDiffusion.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    back = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "again"))
    back.set_progress_bar_config(disable=True)
    assert (ref_image(back) - ref_image(ref)).abs().max().item() <= TOL
    assert (
        ours_image(StableDiffusion.from_pretrained(tmp_path / "again")) - ours_image(ours)
    ).abs().max() == 0


def test_single_file_checkpoint(tiny, tmp_path):
    from safetensors.torch import save_file

    from common.single_file import to_compvis

    folder, ref = tiny
    pipe = StableDiffusion.from_pretrained(folder)
    state = to_compvis(pipe.unet, pipe.vae, pipe.text_encoder)
    state["alphas_cumprod"] = pipe.schedule.alpha_bar.clone()  # what CompVis files also carry: ignored
    path = tmp_path / "tiny-sd.safetensors"
    save_file(state, str(path))
    single = StableDiffusion.from_pretrained(path, config_dir=folder)
    diff = (ours_image(single) - ref_image(ref)).abs().max().item()
    print(f"single file: max |ours - diffusers| = {diff:.2e}")
    assert diff <= TOL

    with pytest.raises(ValueError, match="tokenizer_path"):
        StableDiffusion.from_pretrained(path)  # SD 1.5 configs, no tokenizer given
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        StableDiffusion.from_pretrained(path, tokenizer_path=tmp_path / "nowhere")
    bad = dict(state, **{"model.diffusion_model.not_a_layer.weight": torch.zeros(1)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not_a_layer"):
        StableDiffusion.from_pretrained(tmp_path / "bad.safetensors", config_dir=folder)
    short = {k: v for k, v in state.items() if k != "first_stage_model.decoder.conv_in.weight"}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        StableDiffusion.from_pretrained(tmp_path / "short.safetensors", config_dir=folder)


def test_compvis_names_agree_with_diffusers_converter():
    """Our CompVis names at SD 1.5's configs, read back by diffusers' own converter (on meta: no memory)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from common.autoencoder import AutoencoderKL
    from common.single_file import compvis_names, sd15_configs
    from common.text_encoder import CLIPTextModel
    from common.unet import UNet

    unet_cfg, vae_cfg, text_cfg, _ = sd15_configs()
    with torch.device("meta"):
        unet, vae, text = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
    names = compvis_names(unet, vae, text)
    assert len(names) == len(unet.state_dict()) + len(vae.state_dict()) + len(text.state_dict())
    # tag each CompVis key with its own name so the converter's output shows where it put it
    checkpoint = {compvis: compvis for compvis in names}
    converted = convert_ldm_unet_checkpoint(checkpoint, unet_config_to_diffusers(unet_cfg))
    want = {key: compvis for compvis, (part, key) in names.items() if part == "unet"}
    assert converted == want
    vae_checkpoint = {compvis: torch.zeros(1) for compvis, (part, _) in names.items() if part == "vae"}
    for compvis in vae_checkpoint:
        vae_checkpoint[compvis] = torch.full(
            (1, 1, 1, 1) if ".attn_1." in compvis and compvis.endswith("weight") else (1,),
            float(hash(compvis) % 10_000),
        )
    converted = convert_ldm_vae_checkpoint(vae_checkpoint, vae_cfg.to_diffusers())
    for compvis, (part, key) in names.items():
        if part == "vae":
            assert converted[key].flatten()[0] == vae_checkpoint[compvis].flatten()[0], key


def test_attention_capture(tiny):
    folder, _ = tiny
    pipe = StableDiffusion.from_pretrained(folder)
    out = pipe(
        [PROMPT, "a blue square"],
        num_inference_steps=2,
        generator=0,
        height=SIZE,
        width=SIZE,
        capture_attention=True,
        progress=False,
    )
    assert len(out.images) == 2
    assert out.attention_maps.shape == (2, 77, SIZE, SIZE)
    assert torch.allclose(out.attention_maps.sum(1), torch.ones(2, SIZE, SIZE), atol=1e-4)
    assert out.tokens[0][:2] == ["<|startoftext|>", "a"] or out.tokens[0][1] == "a"


def test_bad_inputs(tiny):
    folder, _ = tiny
    pipe = StableDiffusion.from_pretrained(folder)
    run = dict(num_inference_steps=1, progress=False, output_type="latent")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPT, height=17, width=16, **run)
    with pytest.raises(ValueError, match="empty list"):
        pipe([], **run)
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        pipe(PROMPT, image=torch.rand(1, 3, SIZE, SIZE), strength=1.5, **run)
    with pytest.raises(ValueError, match="mask_image is 8 x 8 but the image is 16 x 16"):
        pipe(PROMPT, image=torch.rand(1, 3, SIZE, SIZE), mask_image=torch.ones(1, 1, 8, 8), **run)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe(PROMPT, sampler="euler", **run)
    with pytest.raises(ValueError, match="unknown output_type"):
        pipe(PROMPT, output_type="np", num_inference_steps=1)
    with pytest.warns(UserWarning, match="dropped"):
        pipe("red " * 100, height=SIZE, width=SIZE, **run)


def test_folder_with_a_part_missing(tiny, tmp_path):
    folder, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unet weights are missing"):
        StableDiffusion.from_pretrained(broken)
    shutil.rmtree(broken / "vae")
    shutil.copytree(folder / "unet", broken / "unet", dirs_exist_ok=True)
    with pytest.raises(FileNotFoundError, match="vae folder is missing"):
        StableDiffusion.from_pretrained(broken)
    shutil.copytree(folder / "vae", broken / "vae")
    config = json.loads((broken / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 128]
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        StableDiffusion.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusion.from_pretrained(broken / "unet")
    with pytest.raises(FileNotFoundError, match="no model at"):
        StableDiffusion.from_pretrained(tmp_path / "nothing")


def test_main_model_path_says_how_to_get_it(monkeypatch, tmp_path):
    import common.pipeline as pipeline

    monkeypatch.setattr(pipeline, "COURSE_MODEL", tmp_path / "course_t2i")
    with pytest.raises(FileNotFoundError, match="train_text_to_image.py"):
        main_model_path()


@pytest.mark.skipif(
    not (main_model_path.__globals__["COURSE_MODEL"] / "model_index.json").is_file(),
    reason="the course model is not shipped yet (06's train_text_to_image.py writes it)",
)
def test_shipped_course_model_loads_in_diffusers():
    path = main_model_path()
    ours = StableDiffusion.from_pretrained(path, device="cpu")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(path))
    ref.set_progress_bar_config(disable=True)
    size = ours.unet.config.sample_size * ours.vae_scale_factor
    a = ours_image(ours, height=size, width=size)
    b = ref_image(ref, height=size, width=size)
    diff = (a - b).abs().max().item()
    print(f"course model: max |ours - diffusers| = {diff:.2e}")
    assert diff <= TOL
