"""Multi-device placement of a FluxPipeline: text encoders and VAE first, then the transformer's device map.

The pure plan is ``blockquant.resources.dispatch_plan.plan_devices``; this module measures the pipeline's
components, applies the plan (side components moved whole) and dispatches the transformer through
accelerate with the ``max_memory`` the plan leaves on each device.
"""
from __future__ import annotations

import torch

from blockquant.resources.dispatch_plan import DevicePlan, plan_devices

SIDE_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (also for meta tensors: their would-be size)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def side_component_sizes(pipe) -> dict[str, int]:
    out = {}
    for name in SIDE_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out[name] = module_bytes(module)
    return out


def transformer_units(transformer) -> list[int]:
    """Bytes of the transformer's unsplittable pieces in the order accelerate fills devices with them:
    its top-level modules, with the block lists expanded into their blocks."""
    units = []
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):
            units.extend(module_bytes(block) for block in child)
        else:
            units.append(module_bytes(child))
    return [u for u in units if u]


def plan_pipeline(pipe, transformer, capacities: dict, headroom: float = 0.1) -> DevicePlan:
    """The plan for ``pipe``'s side components and ``transformer`` on devices with ``capacities`` (bytes)."""
    return plan_devices(capacities, side_component_sizes(pipe), headroom=headroom,
                        main_units=transformer_units(transformer))


def place_side_components(pipe, plan: DevicePlan) -> None:
    for name, device in plan.placements.items():
        getattr(pipe, name).to(_torch_device(device))


def transformer_device_map(transformer, plan: DevicePlan) -> dict:
    """accelerate's device map for the transformer within the plan's per-device budget (blocks kept whole)."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(transformer, max_memory=dict(plan.max_memory),
                                 no_split_module_classes=list(transformer._no_split_modules or []))


def dispatch_pipeline(pipe, transformer, plan: DevicePlan) -> dict:
    """Move the side components and dispatch the transformer; returns the transformer's device map."""
    from accelerate import dispatch_model

    place_side_components(pipe, plan)
    device_map = transformer_device_map(transformer, plan)
    dispatch_model(transformer, device_map=device_map)
    return device_map


def main_bytes_per_device(transformer, device_map: dict) -> dict:
    """Bytes of the transformer placed on each device by ``device_map`` (module prefix -> device)."""
    out: dict = {}
    for name, tensor in list(transformer.named_parameters()) + list(transformer.named_buffers()):
        device = _device_of(name, device_map)
        out[device] = out.get(device, 0) + tensor.numel() * tensor.element_size()
    return out


def _device_of(name: str, device_map: dict):
    best, length = device_map.get(""), -1
    for prefix, device in device_map.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > length:
            best, length = device, len(prefix)
    return best


def cuda_capacities() -> dict[int, int]:
    """Free bytes on each visible CUDA device."""
    return {i: int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


def _torch_device(device) -> torch.device:
    return torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)
