"""Planning where a multi-component model goes on several devices (pure: numbers in, plan out).

A pipeline has one main component that is spread over the devices by accelerate's
``infer_auto_device_map`` (the model being quantized) and side components that each sit whole on one
device (text encoders, a VAE).  The side components are placed first, largest first, each on the
device with the most room left (or, when that would leave the main component's blocks no in-order
fit, the placement that does fit); what remains on every device, less a headroom fraction kept for
activations, is the ``max_memory`` the main component's device map is inferred with.  So no device
is asked to hold more than its capacity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from ..errors import ResourceError


@dataclass(frozen=True)
class DevicePlan:
    """Where each side component goes, what it reserves, and the main component's budget per device."""

    placements: dict[str, Hashable]      # side component -> device
    reserved: dict[Hashable, int]        # device -> bytes taken by side components
    max_memory: dict[Hashable, int]      # device -> bytes left for the main component
    capacities: dict[Hashable, int]

    def describe(self) -> str:
        parts = [f"{name} -> {device}" for name, device in self.placements.items()]
        return "side components: " + (", ".join(parts) if parts else "none")

    def load(self, main_map: dict[Hashable, int] | None = None) -> dict[Hashable, int]:
        """Bytes on each device: the side components plus ``main_map`` (device -> main bytes placed)."""
        main_map = main_map or {}
        return {d: self.reserved.get(d, 0) + main_map.get(d, 0) for d in self.capacities}


def fill_in_order(units: list[int], budgets: dict[Hashable, int], reserve_first: bool = True) -> dict | None:
    """Bytes per device when unsplittable ``units`` fill ``budgets`` in order, never going back (as
    accelerate's ``infer_auto_device_map`` does, which also keeps room for the largest unit on the first
    device); None when they do not fit."""
    devices = list(budgets)
    used = {d: 0 for d in devices}
    largest = max(units, default=0)
    i = 0
    for size in units:
        while i < len(devices):
            room = budgets[devices[i]] - used[devices[i]] - (largest if reserve_first and i == 0 else 0)
            if size <= room:
                used[devices[i]] += size
                break
            i += 1
        else:
            return None
    return used


def _greedy(order, usable, components) -> dict[str, Hashable] | None:
    """Largest first, each on the device with most room left (ties: the later device)."""
    reserved = {d: 0 for d in order}
    placements = {}
    for name, size in sorted(components.items(), key=lambda kv: (-kv[1], kv[0])):
        best = max(order, key=lambda d: (usable[d] - reserved[d], order.index(d)))
        if usable[best] - reserved[best] < size:
            return None
        placements[name] = best
        reserved[best] += size
    return placements


def _assignments(order, components, limit: int = 4096):
    names = sorted(components)
    if len(order) ** len(names) > limit:
        return
    for number in range(len(order) ** len(names)):
        yield {name: order[(number // len(order) ** k) % len(order)] for k, name in enumerate(names)}


def _reserved(order, components, placements) -> dict:
    reserved = {d: 0 for d in order}
    for name, device in placements.items():
        reserved[device] += components[name]
    return reserved


def plan_devices(capacities: dict[Hashable, int], components: dict[str, int], main_size: int | None = None,
                 headroom: float = 0.1, main_units: list[int] | None = None) -> DevicePlan:
    """Place ``components`` (name -> bytes) on devices (device -> capacity in bytes, in fill order).

    ``headroom`` is the fraction of every device kept free for activations.  ``main_units`` are the
    main component's unsplittable pieces in forward order (e.g. embeddings, each block, the head):
    the placement is then one whose leftover lets them fill the devices in order; without them only
    the total ``main_size`` is checked.  Raises ``ResourceError`` when no placement fits.
    """
    if not capacities:
        raise ResourceError("no devices to place the model on")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1) (got {headroom})")
    order = list(capacities)
    usable = {d: int(c * (1 - headroom)) for d, c in capacities.items()}
    if main_units is not None:
        main_size = sum(main_units)

    def leftover(placements):
        reserved = _reserved(order, components, placements)
        if any(reserved[d] > usable[d] for d in order):
            return None
        return {d: usable[d] - reserved[d] for d in order}

    def fits(placements) -> bool:
        left = placements is not None and leftover(placements)
        if not left:
            return False
        if main_units is not None:
            return fill_in_order(main_units, left) is not None
        return main_size is None or sum(left.values()) >= main_size

    placements = _greedy(order, usable, components)
    if not fits(placements) and main_units is not None:
        # the greedy choice can fragment what the main component needs: try every placement (few devices)
        feasible = [p for p in _assignments(order, components) if fits(p)]
        if feasible:
            placements = max(feasible, key=lambda p: min(leftover(p).values()))
    if placements is None:
        biggest = max(components, key=components.get)
        raise ResourceError(
            f"component {biggest} ({components[biggest] / 2**30:.2f} GiB) fits on no device after the others; "
            "use devices with more memory"
        )
    if not fits(placements):
        left = sum(leftover(placements).values())
        largest = max(main_units or [0])
        raise ResourceError(
            f"the model ({main_size / 2**30:.3f} GiB) does not fit, block by block, in the {left / 2**30:.3f} GiB "
            f"left on the devices after the other components (blocks stay whole and the first device keeps room "
            f"for the largest, {largest / 2**30:.3f} GiB); add devices or free memory"
        )
    reserved = _reserved(order, components, placements)
    return DevicePlan(placements=placements, reserved=reserved, max_memory=leftover(placements),
                      capacities=dict(capacities))
