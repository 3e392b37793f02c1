"""Planning where a multi-component model goes on several devices (pure: numbers in, plan out).

A pipeline has one main component that is spread over the devices by accelerate's
``infer_auto_device_map`` (the model being quantized) and side components that each sit whole on one
device (text encoders, a VAE).  The side components are placed first, largest first, each on the
device with the most room left; what remains on every device, less a headroom fraction kept for
activations, is the ``max_memory`` the main component's device map is inferred with.  So no device
is asked to hold more than its capacity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from .errors import ResourceError


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


def plan_devices(capacities: dict[Hashable, int], components: dict[str, int], main_size: int | None = None,
                 headroom: float = 0.1) -> DevicePlan:
    """Place ``components`` (name -> bytes) on devices (device -> capacity in bytes).

    ``headroom`` is the fraction of every device kept free for activations.  Raises ``ResourceError``
    when a side component fits on no device, or when ``main_size`` bytes do not fit in what is left.
    """
    if not capacities:
        raise ResourceError("no devices to place the model on")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1) (got {headroom})")
    usable = {d: int(c * (1 - headroom)) for d, c in capacities.items()}
    reserved = {d: 0 for d in capacities}
    order = list(capacities)
    placements: dict[str, Hashable] = {}
    for name, size in sorted(components.items(), key=lambda kv: (-kv[1], kv[0])):
        # the device with most room left; on ties the later one (accelerate fills the first devices first)
        best = max(order, key=lambda d: (usable[d] - reserved[d], order.index(d)))
        if usable[best] - reserved[best] < size:
            raise ResourceError(
                f"component {name} ({size / 2**30:.2f} GiB) fits on no device (most room left: "
                f"{(usable[best] - reserved[best]) / 2**30:.2f} GiB on {best}); use devices with more memory"
            )
        placements[name] = best
        reserved[best] += size
    max_memory = {d: max(0, usable[d] - reserved[d]) for d in order}
    if main_size is not None and sum(max_memory.values()) < main_size:
        raise ResourceError(
            f"the model ({main_size / 2**30:.2f} GiB) does not fit in the {sum(max_memory.values()) / 2**30:.2f} GiB "
            "left after the other components; add devices or quantize on fewer of them at a time"
        )
    return DevicePlan(placements=placements, reserved=reserved, max_memory=max_memory, capacities=dict(capacities))
