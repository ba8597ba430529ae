"""Model CPU offload: keep the weights in CPU memory and move each block to the GPU only while it runs.

A GPU then holds one block's weights at a time (plus the activations) instead of the whole model: SD 1.5's
UNet is 3.4 GB of fp32 weights, its largest block a few hundred MB. The price is a host-to-device copy of
every block's weights on every call (PCIe: ~10-25 GB/s, so ~0.2 s per UNet call), which is why it is a
last resort for GPUs too small to hold the model.

``enable_model_cpu_offload(model, device)`` registers two hooks on each top-level block (a ModuleList
counts as its elements, since a ModuleList is never called itself):

    forward_pre_hook:  block.to(device); move the tensor inputs to device
    forward_hook:      block.to(offload_device)  (the output stays on device for the next block)

On a machine without a GPU there is nothing to offload to: the function says so and changes nothing.
diffusers' ``enable_model_cpu_offload`` offloads whole models (text encoder, UNet, VAE) of a pipeline as
units; ``enable_sequential_cpu_offload`` goes down to every leaf layer. Offloading by block sits between.
"""

from __future__ import annotations

import torch
from torch import nn


def offload_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks offload moves one at a time: the model's children, with ModuleLists
    opened into their elements."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            units.append((name, child))
    return units


def _to(value, device: torch.device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list):  # in place: a block may consume the list it is given (the UNet's skips)
        value[:] = [_to(v, device) for v in value]
        return value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """The hooks of one offloaded model; ``log`` records ("to" | "back", block name) in
    order; ``remove()`` undoes."""

    def __init__(self, model: nn.Module, device: torch.device, offload_device: torch.device):
        self.model, self.device, self.offload_device = model, device, offload_device
        self.log: list[tuple[str, str]] = []
        self.handles = []
        params_outside = [n for n, _ in model.named_parameters(recurse=False)]
        if params_outside:
            raise ValueError(
                f"parameters {params_outside} belong to the model itself, not to a block: offload "
                f"moves blocks, so wrap them in a submodule"
            )
        model.to(offload_device)
        for name, unit in offload_units(model):
            self.handles.append(unit.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(unit.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            module.to(self.device)
            self.log.append(("to", name))
            return _to(args, self.device), _to(kwargs, self.device)

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            module.to(self.offload_device)
            self.log.append(("back", name))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def enable_model_cpu_offload(
    model: nn.Module,
    device: str | torch.device = "cuda",
    offload_device: str | torch.device = "cpu",
    *,
    quiet: bool = False,
) -> ModelOffload | None:
    """Offload ``model`` block by block to ``offload_device``, bringing each to ``device`` while it runs.

    Returns the ``ModelOffload`` (``.remove()`` switches it off), or None when ``device`` is the
    offload device itself (a CPU-only machine): there is no smaller memory to save, and a message says so.
    Inputs may live on either device; the output is on ``device``.
    """
    device, offload_device = torch.device(device), torch.device(offload_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but CUDA is not available here; use device='cpu' (a no-op)"
        )
    if device == offload_device:
        if not quiet:
            print(
                f"model CPU offload: the model already runs on {device}, where its weights live; nothing to "
                f"offload (it saves GPU memory only)"
            )
        return None
    return ModelOffload(model, device, offload_device)


def offload_for_test(model: nn.Module) -> ModelOffload:
    """The hooks with ``device`` = ``offload_device`` = cpu: every move is a no-op,
    the log shows the order."""
    return ModelOffload(model, torch.device("cpu"), torch.device("cpu"))
