"""Where a pipeline's other components go while one of its models is quantized.

Every ``torch.nn.Module`` among a pipeline's components other than the model being quantized (text
encoders, an autoencoder) sits whole on one device and only drives calibration.  On one device they all
go to the run's device.  With ``--device_map auto`` and several CUDA devices they are spread by
``dispatch_plan.plan_devices`` over the devices' free memory, leaving room for what the run holds of the
quantized model at once: its weights outside the blocks (on the run's device, the first) and one block.
"""
from __future__ import annotations

import logging

import torch

from .dispatch_plan import DevicePlan, plan_devices

log = logging.getLogger("blockquant")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (for meta tensors: their would-be size)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def other_components(pipeline, model) -> dict[str, torch.nn.Module]:
    """The pipeline's modules besides ``model`` (a diffusers pipeline lists them in ``components``)."""
    components = getattr(pipeline, "components", None) or {}
    return {n: m for n, m in components.items() if isinstance(m, torch.nn.Module) and m is not model}


def resident_units(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[int]:
    """What a block-by-block run holds of ``model``: bytes outside the blocks, then its largest block."""
    sizes = [module_bytes(b) for b in blocks]
    return [module_bytes(model) - sum(sizes), max(sizes, default=0)]


def plan_components(pipeline, model, capacities: dict, units: list[int], headroom: float = 0.1) -> DevicePlan:
    """The plan for ``pipeline``'s other components on devices with ``capacities`` (bytes), the quantized
    model's unsplittable ``units`` filling what is left in device order."""
    sizes = {n: module_bytes(m) for n, m in other_components(pipeline, model).items()}
    return plan_devices(capacities, sizes, headroom=headroom, main_units=units)


def apply_plan(pipeline, model, plan: DevicePlan | None, device: torch.device) -> None:
    """Move every other component to its planned device (all to ``device`` without a plan)."""
    for name, module in other_components(pipeline, model).items():
        target = device if plan is None else plan.placements[name]
        module.to(torch.device(f"cuda:{target}") if isinstance(target, int) else torch.device(target))


def place_components(pipeline, model, blocks: list[torch.nn.Module], device: torch.device,
                     device_map: str | None) -> DevicePlan | None:
    """Place the other components for a run on ``device`` (planned over all CUDA devices with
    ``device_map="auto"`` and more than one); returns the plan, or None when everything went to ``device``."""
    plan = None
    if device_map == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1:
        first = device.index or 0                  # the run's device fills first: it holds the weights outside the blocks
        order = [first] + [i for i in range(torch.cuda.device_count()) if i != first]
        capacities = {i: int(torch.cuda.mem_get_info(i)[0]) for i in order}
        plan = plan_components(pipeline, model, capacities, resident_units(model, blocks))
        log.info("pipeline components placed by plan: %s", plan.describe())
    apply_plan(pipeline, model, plan, device)
    return plan
