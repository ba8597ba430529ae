"""Chapter 05's end-to-end row and the UNet's gradient checkpointing.

* end_to_end.py: the course's pipeline and diffusers' StableDiffusionPipeline, built from the same tiny random
  weights and the same DPM-Solver++ scheduler, give the same image within 1/255; the timed row and its
  breakdown (the text encoder once for ours, both prompts in one batch, twice for diffusers'; one UNet call
  per step; one decode) come out of one run.
* checkpointing: the same gradients with and without (within 1e-5), and the same as diffusers' checkpointed
  UNet with the same weights; diffusers' regions (each ResNet but the mid block's first, each transformer
  block) are recomputed once, nothing else is; a model whose first layers are frozen still gets every
  gradient it should, through either form of checkpoint; a checkpointed step keeps the activations
  diffusers' keeps and recomputes its arithmetic plus each transformer block's last Linear, to the FLOP.
* the same kernels: in inference the course's UNet and VAE decoder run no operator more often than diffusers'
  and copy no more memory (the end-to-end times rest on that).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from common.attention import SpatialTransformer, TransformerBlock
from common.convert import unet_config_to_diffusers
from common.unet import UNet, UNetConfig
from common.unet_blocks import ResnetBlock2D

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CHAPTER = Path(__file__).resolve().parents[1] / "05_memory_efficient_diffusion"


def _load(name: str):
    if str(CHAPTER) not in sys.path:  # end_to_end.py and checkpointing.py import their folder's benchmark.py
        sys.path.insert(0, str(CHAPTER))
    spec = importlib.util.spec_from_file_location(f"ch05_{name}", CHAPTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    return _load("end_to_end")


@pytest.fixture(scope="module")
def pipelines(e2e, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield e2e.build_pipelines(quick=True, tmp=tmp_path_factory.mktemp("e2e"))
    torch.set_num_threads(n)


def test_same_image_as_diffusers(e2e, pipelines):
    ours, ref = pipelines
    a = e2e.generate("ours", ours, steps=4, image_side=32)
    b = e2e.generate("diffusers", ref, steps=4, image_side=32)
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert (a - b).abs().max().item() <= e2e.TOL
    assert b.std() > 0.01  # an image, not a constant
    c = e2e.generate("ours", ours, steps=4, image_side=32, seed=1)
    assert (a - c).abs().max().item() > 0.05  # another seed, another image: the comparison can fail


def test_row_and_breakdown(e2e, pipelines):
    ours, ref = pipelines
    row = e2e.run_setting(ours, ref, "fp32", device=torch.device("cpu"), steps=3, image_side=32, repeats=2)
    assert row["same_image"] and row["max_abs_diff"] <= e2e.TOL
    assert len(row["ours_times"]) == len(row["diffusers_times"]) == 2
    assert row["time_ratio"] == pytest.approx(row["ours_s"] / row["diffusers_s"])
    for side in ("ours", "diffusers"):
        stages = [s["stage"] for s in row[f"{side}_breakdown"]["stages"]]
        # the prompt and the empty prompt (ours in one batch, diffusers' one after the other), one batched
        # UNet call per step (CFG), one decode
        encodes = 1 if side == "ours" else 2
        assert stages == ["text encoder"] * encodes + ["UNet"] * 3 + ["VAE decode"], stages
        b = e2e.summarize_breakdown(row[f"{side}_breakdown"])
        parts = b["text_encoder_s"] + b["unet_s"] + b["decode_s"] + b["other_s"]
        assert parts == pytest.approx(b["total_s"]) and min(b["unet_calls"]) > 0
    table = e2e.table_row(row)
    assert set(table) <= set(e2e.COLUMNS) and table["ours_unet_call_s"] > 0
    for side in ("ours", "diffusers"):  # what each call cost the kernel (page faults), on a CPU
        assert row[f"{side}_page_faults"] >= 0 and row[f"{side}_system_s"] >= 0
        assert row[f"{side}_breakdown"]["page_faults"] >= 0
    with pytest.raises(ValueError, match="unknown setting"):
        e2e.set_precision(ours, ref, "int8")


def test_cli_writes_the_row_and_the_allocator_it_ran_with(tmp_path):
    """The command the chapter README gives, on the tiny configurations, in its own process (the allocator
    setting is process-wide): the table, and the JSON saying which allocator the times were taken with."""
    import json
    import os
    import platform
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_FAST": "1"}
    cmd = [sys.executable, str(CHAPTER / "benchmark.py"), "--end-to-end", "--quick", "--steps", "2"]
    cmd += ["--repeats", "1", "--reuse-freed-memory", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=CHAPTER.parent)
    info = json.loads((tmp_path / "end_to_end.json").read_text())
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert info["allocator"] == ("reuse freed memory" if glibc else "default (not glibc: unchanged)")
    assert [r["setting"] for r in info["rows"]] == ["fp32"] and info["rows"][0]["same_image"]
    assert "| fp32 | 2 | 32 | 1 |" in (tmp_path / "end_to_end.md").read_text()


# ---- gradient checkpointing ------------------------------------------------------------------------------


def _inputs(cfg, batch=2, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    return z_t, torch.tensor([10, 900]), context


def _grads(model, forward):
    model.zero_grad(set_to_none=True)
    forward().square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def unet_pair():
    torch.manual_seed(0)
    ours = UNet(UNetConfig.tiny()).train()
    ref = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(ours.config)).train()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_checkpointing_same_gradients_as_without_and_as_diffusers(unet_pair):
    ours, ref = unet_pair
    z_t, t, context = _inputs(ours.config)
    plain = _grads(ours, lambda: ours(z_t, t, context))
    ours.enable_gradient_checkpointing()
    ref.enable_gradient_checkpointing()
    checkpointed = _grads(ours, lambda: ours(z_t, t, context))
    theirs = _grads(ref, lambda: ref(z_t, t, encoder_hidden_states=context).sample)
    assert set(checkpointed) == set(plain) == set(theirs) == {n for n, _ in ours.named_parameters()}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(checkpointed[name], theirs[name], atol=1e-5, rtol=1e-5)


def test_checkpointing_recomputes_diffusers_regions_once(unet_pair):
    """Each transformer block and each ResNet but the mid block's first is recomputed once in backward, never
    more (no nested checkpoints); a spatial transformer's norm and projections, and the mid block's first
    ResNet, are not recomputed: diffusers' regions."""
    ours, _ = unet_pair
    z_t, t, context = _inputs(ours.config)
    transformer = next(m for m in ours.modules() if isinstance(m, SpatialTransformer))
    modules = {
        "spatial transformer": transformer,
        "transformer block": next(m for m in transformer.modules() if isinstance(m, TransformerBlock)),
        "resnet": next(m for m in ours.up_blocks[0].modules() if isinstance(m, ResnetBlock2D)),
        "mid block's first resnet": ours.mid_block.resnets[0],
        "mid block's second resnet": ours.mid_block.resnets[1],
    }
    calls = dict.fromkeys(modules, 0)
    hooks = [
        m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, m in modules.items()
    ]
    ours.enable_gradient_checkpointing()
    _grads(ours, lambda: ours(z_t, t, context))
    ours.disable_gradient_checkpointing()
    _grads(ours, lambda: ours(z_t, t, context))
    for h in hooks:
        h.remove()
    # a checkpointed region runs twice in a checkpointed step (the forward, once more in backward), once in a
    # plain one
    assert calls == {
        "spatial transformer": 2,
        "transformer block": 3,
        "resnet": 3,
        "mid block's first resnet": 2,
        "mid block's second resnet": 3,
    }


@pytest.mark.parametrize(
    "trains, form",
    [("attentions", "reentrant"), ("transformer_blocks", "non-reentrant")],
)
def test_checkpointing_with_frozen_first_layers(unet_pair, trains, form, monkeypatch):
    """Only part of the UNet trains (as when fine-tuning attention). With the spatial transformers' weights
    training, each transformer block's input requires grad (it has passed proj_in): the reentrant form. With
    only the transformer blocks training, the first block's input and context need no gradient, where the
    reentrant form would return no gradients for the block's weights: the non-reentrant form. Either way,
    every gradient matches the plain step's."""
    import common.attention

    ours, _ = unet_pair
    for name, p in ours.named_parameters():
        p.requires_grad_(trains in name)
    z_t, t, context = _inputs(ours.config)
    plain = _grads(ours, lambda: ours(z_t, t, context))
    ours.enable_gradient_checkpointing()
    forms = []
    real = common.attention.checkpoint

    def spy(fn, *args, use_reentrant, **kwargs):
        if isinstance(fn, TransformerBlock):
            forms.append("reentrant" if use_reentrant else "non-reentrant")
        return real(fn, *args, use_reentrant=use_reentrant, **kwargs)

    monkeypatch.setattr(common.attention, "checkpoint", spy)
    checkpointed = _grads(ours, lambda: ours(z_t, t, context))
    assert forms[0] == form
    assert set(checkpointed) == set(plain) and any(n.startswith("down_blocks.0.attentions") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5)


def test_checkpointing_table_runs():
    ck = _load("checkpointing")
    rows = ck.run_table(config="tiny", side_px=8, batch=2, repeats=1, log=lambda _: None)
    by = {r["side"]: r for r in rows}
    assert set(by) == {"ours", "diffusers"}
    for r in rows:
        assert r["ckpt_GFLOP"] > r["plain_GFLOP"] > 0  # the recomputed forward shows in the FLOPs
        assert 0 < r["ckpt_saved_MiB"] < r["plain_saved_MiB"]  # and the dropped activations in what is saved
        assert 0 < r["ckpt_tensor_MiB"] < r["plain_tensor_MiB"]  # and in the tensors' peak during the step
    # the same plain graph on both sides; checkpointed, the same regions, so the same activations kept
    assert by["ours"]["plain_saved_MiB"] == pytest.approx(by["diffusers"]["plain_saved_MiB"], rel=1e-6)
    assert by["ours"]["plain_GFLOP"] == pytest.approx(by["diffusers"]["plain_GFLOP"], rel=1e-9)
    assert by["ours"]["ckpt_saved_MiB"] == pytest.approx(by["diffusers"]["ckpt_saved_MiB"], rel=1e-6)
    # and the same arithmetic recomputed but each transformer block's last Linear, which the reentrant form
    # reruns and diffusers' non-reentrant one does not
    ours = ck.build("tiny")["ours"]
    z_t, t, context, _ = ck.batch_of(ours.config, 2, 8)
    last = [m.ff.net[2] for m in ours.modules() if isinstance(m, TransformerBlock)]
    linear_flops = []
    hooks = [
        lin.register_forward_hook(
            lambda mod, args, _: linear_flops.append(2 * args[0].numel() * mod.out_features)
        )
        for lin in last
    ]
    with torch.no_grad():
        ours(z_t, t, context)
    for h in hooks:
        h.remove()
    assert len(linear_flops) == len(last) > 0
    extra = by["ours"]["ckpt_GFLOP"] - by["diffusers"]["ckpt_GFLOP"]
    assert extra == pytest.approx(sum(linear_flops) / 1e9, rel=1e-6)


# --- the same kernels as diffusers: what the end-to-end row's time rests on ---------------------------------


def _model_pairs():
    """(name, ours, diffusers', their two calls): the UNet (guidance batch of 2) and the VAE decoder."""
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    ref_unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet.config)).eval()
    ref_unet.load_state_dict(unet.state_dict())
    vae = AutoencoderKL(AutoencoderConfig.tiny()).eval()
    ref_vae = diffusers.AutoencoderKL(**vae.config.to_diffusers()).eval()
    ref_vae.load_state_dict(vae.state_dict())
    z_t, t, context = _inputs(unet.config, side=16)
    z_0 = torch.randn(1, vae.config.latent_channels, 8, 8)
    return [
        ("UNet", lambda: unet(z_t, t, context), lambda: ref_unet(z_t, t, encoder_hidden_states=context)),
        ("VAE decode", lambda: vae.decode(z_0), lambda: ref_vae.decode(z_0)),
    ]


def test_inference_dispatches_no_kernel_diffusers_does_not():
    """Count every operator that computes (views aside) in one forward: the course's modules may not run any
    operator more often than diffusers' do with the same weights (they run fewer: no divisions by an output
    scale factor of 1)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for name, ours, theirs in _model_pairs():
            with Count() as a:
                ours()
            with Count() as b:
                theirs()
            # copies are compared by the elements they move, below (some happen inside other kernels)
            more = {
                op: (a.ops[op], b.ops[op]) for op in a.ops if a.ops[op] > b.ops[op] and op != "aten.clone"
            }
            assert not more, f"{name}: operators run more often than in diffusers (ours, theirs): {more}"


def test_inference_copies_no_more_memory_than_diffusers():
    """Every aten::clone the profiler sees, those inside other kernels included (a LayerNorm copies a strided
    input before normalising it): the course's UNet and decoder copy no more elements than diffusers'. A
    spatial transformer whose tokens stay in channels-first order after proj_in fails this (each of its
    three LayerNorms then copies them)."""
    from torch.profiler import ProfilerActivity, profile

    def copied(fn):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return sum(
            torch.Size(e.input_shapes[0]).numel()
            for e in prof.events()
            if e.name == "aten::clone" and e.input_shapes and e.input_shapes[0]
        )

    for name, ours, theirs in _model_pairs():
        ours(), theirs()  # warm-up
        a, b = copied(ours), copied(theirs)
        assert a <= b, f"{name}: ours copies {a} elements in one forward, diffusers' {b}"
