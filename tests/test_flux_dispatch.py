"""Multi-device planning on a FLUX pipeline: the other components reserved first, the transformer inside what
is left (core/resources/dispatch_plan.py, placed by core/resources/components.py)."""
import pytest
import torch

pytest.importorskip("diffusers")

from blockquant.adapters import flux  # noqa: E402
from blockquant.resources import components  # noqa: E402
from blockquant.resources.dispatch_plan import plan_devices  # noqa: E402
from blockquant.errors import ResourceError  # noqa: E402


@pytest.fixture(scope="module")
def example():
    return flux.example_model()


def test_pure_plan_keeps_every_device_under_capacity():
    capacities = {0: 100, 1: 400, 2: 250, 3: 60}
    sides = {"text_encoder_2": 180, "text_encoder": 50, "vae": 40}
    plan = plan_devices(capacities, sides, main_size=300, headroom=0.1)
    # usable 90/360/225/54; largest first onto the device with most room left:
    # T5 -> 1 (360 -> 180 left), CLIP -> 2 (225 -> 175), VAE -> 1 (180 > 175)
    assert plan.placements == {"text_encoder_2": 1, "text_encoder": 2, "vae": 1}
    assert plan.reserved == {0: 0, 1: 220, 2: 50, 3: 0}
    assert plan.max_memory == {0: 90, 1: 140, 2: 175, 3: 54}
    for device, capacity in capacities.items():
        assert plan.reserved[device] + plan.max_memory[device] <= capacity * 0.9
    assert sum(plan.max_memory.values()) >= 300


def test_pure_plan_refuses_what_cannot_fit():
    with pytest.raises(ResourceError, match="text_encoder_2"):
        plan_devices({0: 100, 1: 100}, {"text_encoder_2": 95})
    with pytest.raises(ResourceError, match="does not fit"):
        plan_devices({0: 100, 1: 100}, {"vae": 10}, main_size=200)
    with pytest.raises(ResourceError):
        plan_devices({}, {})


@pytest.fixture(scope="module")
def deep_transformer():
    """A meta-device FLUX transformer with many small blocks (sizes only; nothing is allocated)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = dict(example_config := flux.example_model().model.config)
    config.update(num_layers=6, num_single_layers=12)
    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config), example_config


def _units(model):
    """The pieces accelerate's device map keeps whole, in its fill order: top-level modules, block lists expanded."""
    units = []
    for child in model.children():
        blocks = child if isinstance(child, torch.nn.ModuleList) else [child]
        units.extend(components.module_bytes(b) for b in blocks)
    return [u for u in units if u]


def _main_bytes_per_device(model, device_map: dict) -> dict:
    """Bytes of ``model`` placed on each device by ``device_map`` (module prefix -> device), longest prefix wins."""
    out: dict = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        prefixes = [p for p in device_map if not p or name == p or name.startswith(p + ".")]
        device = device_map[max(prefixes, key=len)]
        out[device] = out.get(device, 0) + tensor.numel() * tensor.element_size()
    return out


def _fill(pipe, tr, shares):
    sides = components.other_components(pipe, pipe.transformer)
    total = sum(components.module_bytes(m) for m in sides.values()) + components.module_bytes(tr)
    return {i: int(total * s) for i, s in enumerate(shares)}


def test_other_components_are_the_pipeline_modules_besides_the_model(example):
    pipe = example.pipeline
    assert set(components.other_components(pipe, example.model)) == {"text_encoder", "text_encoder_2", "vae"}
    units = components.resident_units(example.model, list(example.model.transformer_blocks)
                                      + list(example.model.single_transformer_blocks))
    blocks = [components.module_bytes(b) for b in example.model.transformer_blocks] + \
             [components.module_bytes(b) for b in example.model.single_transformer_blocks]
    assert units == [components.module_bytes(example.model) - sum(blocks), max(blocks)]


@pytest.mark.parametrize("shares", [(0.2, 1.0, 0.45), (0.7, 0.15, 0.6), (0.35, 0.35, 0.35, 0.35), (0.9, 0.1, 0.1, 0.5)])
def test_plan_with_accelerate_device_map_on_uneven_devices(example, deep_transformer, shares):
    """Real component sizes, uneven capacities, accelerate's own device map of the transformer."""
    from accelerate import infer_auto_device_map

    pipe, tr = example.pipeline, deep_transformer[0]
    capacities = _fill(pipe, tr, shares)
    plan = components.plan_components(pipe, pipe.transformer, capacities, _units(tr), headroom=0.1)
    assert set(plan.placements) == {"text_encoder", "text_encoder_2", "vae"}
    device_map = infer_auto_device_map(tr, max_memory=dict(plan.max_memory),
                                       no_split_module_classes=list(tr._no_split_modules))
    placed = _main_bytes_per_device(tr, device_map)
    assert set(placed) <= set(capacities), f"transformer spilled off the GPUs: {device_map}"
    for device, used in plan.load(placed).items():
        assert used <= capacities[device], f"device {device}: {used} > {capacities[device]} ({device_map})"
    assert sum(placed.values()) == components.module_bytes(tr)
    blocks = {k for k in device_map if "transformer_blocks." in k}
    assert all(k.count(".") == 1 for k in blocks), "a block was split across devices"


def test_plan_refuses_when_blocks_cannot_fill_the_devices_in_order(example):
    """The tiny example's blocks are a third of the model each: (0.5, 0.5, 0.5) sums up but does not fit
    in order; accelerate given the same budgets would spill a block to disk, so the plan refuses."""
    from accelerate import infer_auto_device_map

    from blockquant.resources.dispatch_plan import _greedy

    pipe, tr = example.pipeline, example.model
    capacities = _fill(pipe, tr, (0.5, 0.5, 0.5))
    with pytest.raises(ResourceError, match="block by block"):
        components.plan_components(pipe, tr, capacities, _units(tr), headroom=0.1)
    sides = {n: components.module_bytes(m) for n, m in components.other_components(pipe, tr).items()}
    usable = {d: int(c * 0.9) for d, c in capacities.items()}
    placements = _greedy(list(capacities), usable, sides)
    budgets = {d: usable[d] - sum(sides[n] for n, pd in placements.items() if pd == d) for d in capacities}
    assert sum(budgets.values()) > components.module_bytes(tr)
    device_map = infer_auto_device_map(tr, max_memory=dict(budgets, disk=10 ** 12),
                                       no_split_module_classes=list(tr._no_split_modules))
    assert "disk" in device_map.values()


def test_placing_by_plan_keeps_what_the_pipeline_generates():
    """A plan applied to a real pipeline (one CPU 'device'), then the run's placement on one device: each
    component lands where it was put, and generation is bit-identical."""
    from blockquant.adapters.flux.example import build_pipeline

    pipe = build_pipeline()
    tr = pipe.transformer
    prompt = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent")
    expected = pipe("a kite", generator=torch.Generator().manual_seed(0), **prompt).images
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    capacity = 4 * (sum(components.module_bytes(m) for m in components.other_components(pipe, tr).values())
                    + components.module_bytes(tr))
    plan = components.plan_components(pipe, tr, {"cpu": capacity}, components.resident_units(tr, blocks))
    assert plan.placements == {"text_encoder_2": "cpu", "text_encoder": "cpu", "vae": "cpu"}
    components.apply_plan(pipe, tr, plan, torch.device("cpu"))
    assert components.place_components(pipe, tr, blocks, torch.device("cpu"), "auto") is None   # one device: no plan
    assert all(next(m.parameters()).device.type == "cpu" for m in components.other_components(pipe, tr).values())
    got = pipe("a kite", generator=torch.Generator().manual_seed(0), **prompt).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
