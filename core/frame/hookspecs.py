"""The hook contract between the blockquant engine and its adapters.

This module is the whole contract: every hook an adapter may implement is declared here, with
its arguments, its return value, whether it is ``firstresult`` (the first non-None answer wins)
and the blockquant version that introduced it.

An adapter is a module (or object) whose functions are marked with ``blockquant.hookimpl`` and
whose names are exactly the names below.  A misspelt hook name is an error at registration.
A run's plugin manager holds the selected adapter plus the engine's defaults (registered
``trylast``), so an adapter only implements what its models need.

The order in which a run calls the hooks::

    adapter_info -> load_model -> fixed_attrs -> patch_model -> calibration_batches -> pre_cache
    -> run_calibration (capture; once per calibration batch)
    -> per block: [replay_inputs -> block -> block_outputs] per sample (fp targets, tuning, outputs)
       -> post_hook_removal (only where the block was dispatched over several devices)
    -> export

``example_model`` is called instead of loading a folder when no model is given (and by tests).

Every hook after ``adapter_info`` may declare a ``ctx`` argument: the run's ``blockquant.RunContext``
(settings, the adapter's options, the loaded model with its processor and pipeline, traits, block
groups, device, and a typed ``stash`` for the adapter's own state).  Hooks that need nothing from it
simply leave it out.

``gguf_layout`` is called once, before the block loop, by runs that write ``--format gguf:TYPE``.

Note for implementers (a pluggy rule): a hookimpl argument with a default value is never passed.
Declare exactly the arguments you use, without defaults.
"""
from __future__ import annotations

import pluggy

PROJECT = "blockquant"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def adapter_info():
    """Describe the adapter.

    Called when adapters are listed and when one is selected.

    Returns:
        ``blockquant.AdapterInfo``: name, the ``model_type`` values and architecture class names
        it handles (used for auto-detection), the pipeline class names for diffusers folders, and
        the library versions it supports as PEP 440 specifiers, e.g.
        ``{"transformers": ">=5.5.4,<6"}``.  A run outside a declared range stops with a message
        naming the range.

    firstresult: yes.  Since: 0.1.
    """


@hookspec(firstresult=True)
def load_model(source, settings, ctx):
    """Build the model to quantize from a local folder, without materialising its weights.

    Args:
        source: ``blockquant.model.model_io.ModelSource`` - the resolved folder, its config.json
            (or model_index.json) and the safetensors index.
        settings: ``blockquant.RunSettings``.
        ctx: ``blockquant.RunContext`` with ``settings``, ``options`` and ``source`` set.

    Returns:
        ``blockquant.model.model_io.LoadedModel`` or None for the engine's default (a transformers
        model built on the meta device whose weights stream from the shards block by block).
        Adapters for pipelines (diffusers) return the component to quantize plus the
        pipeline that drives calibration.

    firstresult: yes.  Since: 0.1.
    """


@hookspec
def fixed_attrs(model, ctx):
    """Pin per-model engine traits.

    Args:
        model: the loaded model (parameters may still be on the meta device).
        ctx: ``blockquant.RunContext``.

    Returns:
        dict whose keys are fields of ``blockquant.Traits`` (block groups, optional groups, shared keys, rebuilt
        keys, variable-input policy, layers kept in full precision, batch-size cap, output
        layout, checkpoint renames).  Results of all implementations are merged, the engine's
        defaults first, so an adapter returns only what it changes.  An unknown key is an error
        naming the adapter and the key.

    firstresult: no (merged).  Since: 0.1.
    """


@hookspec
def patch_model(model, ctx):
    """Apply the adapter's model patches.

    Must be idempotent: calling it twice leaves the model exactly as calling it once (no double
    wrapping).  Called once per run, after ``fixed_attrs`` and before calibration (the adapter kit
    calls it a second time to check idempotence).  What accelerate's hook removal undoes is re-applied
    by ``post_hook_removal``, which an adapter usually implements by applying its patches again.

    Args:
        model: the model to patch (in place).
        ctx: ``blockquant.RunContext``.

    Returns:
        None.

    firstresult: no.  Since: 0.1.
    """


@hookspec(firstresult=True)
def calibration_batches(model, source, settings, ctx):
    """Produce calibration inputs.

    Args:
        model: the loaded model (``LoadedModel.model``).
        source: ``blockquant.data.calibration_data.CalibrationSource`` - what the user passed with
            ``--dataset`` (strings, a file, a hub name) and ``--images``, and the processor or
            tokenizer loaded beside the model.
        settings: ``blockquant.RunSettings`` (nsamples, seqlen, seed, ...).
        ctx: ``blockquant.RunContext``.

    Returns:
        a list of batches; each batch is whatever ``run_calibration`` takes - for a transformers
        model, the keyword arguments of ``model(**batch)`` (tokenized text, or a processor's
        output for image + text).

    firstresult: yes.  Since: 0.1.
    """


@hookspec
def pre_cache(model, calibration, ctx):
    """Last preparation before the capture forward.

    Move what the capture forward needs, attach references, and register capture-time hooks
    through ``calibration.hook(...)`` (removed after capture).  Values the replay needs later
    are stored with ``calibration.record(key, value)``: they are attached to the next captured
    sample of the next block group and reach ``replay_inputs`` as ``cached.extras[key]``.

    Args:
        model: the model.
        calibration: ``blockquant.run.capture.Calibration``.
        ctx: ``blockquant.RunContext``.

    Returns:
        None.

    firstresult: no.  Since: 0.1.
    """


@hookspec(firstresult=True)
def run_calibration(model, batch, ctx):
    """Run one calibration batch through the model (the capture forward).

    The engine's default calls ``model(**batch)``.  Pipelines run their whole denoising loop
    here; the first block of each group is captured every time it is called.

    Args:
        model: the model (or the pipeline-wrapped component).
        batch: one item of ``calibration_batches``.
        ctx: ``blockquant.RunContext`` (a pipeline that drives the model is ``ctx.pipeline``).

    Returns:
        anything not None (ignored); None lets the next implementation run.

    firstresult: yes.  Since: 0.1.
    """


@hookspec(firstresult=True)
def replay_inputs(block, index, cached, ctx):
    """Rebuild the keyword arguments that vary from block to block.

    Called before a block is run on one calibration sample during replay (fp targets, tuning,
    quantized outputs, ``quant verify``).

    Args:
        block: the block module about to run.
        index: ``blockquant.BlockRef`` - group number, chain position, index within its
            module list, and global block number.
        cached: ``blockquant.SampleInputs`` - the sample's first-block keyword arguments
            (``kwargs``), what the adapter recorded at capture (``extras``), and a mutable
            ``state`` dict that lives for this replay stream only (the fp and the quantized
            replay each have their own), e.g. for shared KV state written by earlier blocks.
        ctx: ``blockquant.RunContext`` (``ctx.model`` reaches the model that owns the block).

    Returns:
        dict of keyword arguments to set (or override) for this block, or None.

    firstresult: yes.  Since: 0.1.
    """


@hookspec(firstresult=True)
def block_outputs(block, index, output, inputs, cached, ctx):
    """Map a block's output to the streams that feed the next block.

    Args:
        block: the block that ran.
        index: ``blockquant.BlockRef`` of that block.
        output: what ``block(**inputs)`` returned, for one sample.
        inputs: the keyword arguments it was called with.
        cached: ``blockquant.SampleInputs`` of the sample (see ``replay_inputs``).
        ctx: ``blockquant.RunContext``.

    Returns:
        dict of stream tensors, e.g. ``{"hidden_states": out}``; a two-stream block returns both
        ``hidden_states`` and ``encoder_hidden_states``.  The tuning loss covers every stream.
        The engine's default takes ``output[0]`` (or ``output``) as ``hidden_states``.

    firstresult: yes.  Since: 0.1.
    """


@hookspec
def post_hook_removal(model, ctx):
    """Re-apply what accelerate's ``remove_hook_from_submodules`` took away.

    Called after a block that was dispatched over several devices (``--device_map auto``) has had
    its dispatch hooks removed; the adapter kit calls it after its own dispatch round trip.

    Args:
        model: the model.
        ctx: ``blockquant.RunContext``.

    Returns:
        None.

    firstresult: no.  Since: 0.1.
    """


@hookspec(firstresult=True)
def example_model():
    """Build a tiny random model of the adapter's family, offline.

    Used by tests, demos (``quant --adapter NAME`` with no model) and benchmarks.

    Returns:
        ``blockquant.ExampleModel``: the model, its tokenizer or processor (or pipeline), and a
        ``save(folder)`` that writes a hub-like folder the real loading code reads.

    firstresult: yes.  Since: 0.1.
    """


@hookspec(firstresult=True)
def gguf_layout(model, ctx):
    """Describe how the model is written as a GGUF file (llama.cpp), for ``--format gguf:TYPE``.

    Which architecture name llama.cpp knows the model by, the GGUF name of every checkpoint
    tensor, the ``{arch}.*`` hyper-parameters and any row reordering llama.cpp's own converter
    applies (e.g. the rotary q/k permutation of its "llama" architecture) are model knowledge.

    Args:
        model: the loaded model (parameters may be on the meta device; read its config).
        ctx: ``blockquant.RunContext``.

    Returns:
        ``blockquant.GgufLayout``, or None when the adapter cannot write this model as GGUF
        (the run then stops before tuning with a message naming the adapter and model type).
        Raise ``blockquant.UsageError`` for a model the family supports but GGUF export does not
        (e.g. a rope scaling the converter would need extra tensors for).

    firstresult: yes.  Since: 0.2.
    """
