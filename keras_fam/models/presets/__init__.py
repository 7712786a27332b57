"""Load KerasHub presets into TransformerFAM models, reusing their weights.

`keras_fam.models.FAMBackbone.from_preset` and
`keras_fam.models.FAMCausalLM.from_preset` call `backbone_from_preset` and
`causal_lm_from_preset` below. Given anything KerasHub accepts as a preset (a
built-in name, a local directory, `kaggle://`, `hf://`), they

1. ask KerasHub's own preset loader which backbone class the preset holds;
2. if it is already a FAM preset (saved by `save_to_preset` on a FAM model),
   load it with KerasHub's own `from_preset`;
3. otherwise load the original backbone with
   `keras_hub.models.Backbone.from_preset` (and the preprocessor with
   `keras_hub.models.CausalLMPreprocessor.from_preset`), build a
   `FAMBackbone` from the family adapter's config mapping, and copy every
   weight through the adapter's weight mapping. Every original weight must be
   used and every FAM weight filled, except the new FAM summary embeddings.

Each family adapter (`gemma`, `gemma3`, `llama`, `mistral`, `phi3`,
`qwen`, `qwen3`, `gpt2`) is a module with two
functions and nothing else: `convert_config(backbone)` returns `FAMBackbone`
arguments read from the loaded KerasHub backbone (its config and, where
KerasHub's layers do not follow their config, the layers themselves), and
`weight_map(backbone)` returns `{fam_weight_path: (original_weight_path,
transform)}`.

With `fam_length=0` and `memory_segments * block_size` at least the input
length, a converted model computes what the original computes (the tests
check logits to 1e-4 in float32 for every family). With `fam_length > 0` it is
a TransformerFAM to fine-tune (the paper fine-tunes with LoRA).

Overrides passed to `from_preset` set the FAM and training arguments
(`block_size`, `memory_segments`, `fam_length`, `dropout`,
`state_passing_probability`, ...); arguments that the preset determines (the
architecture) cannot be overridden.
"""

import contextlib
import inspect
import json
import os

import keras
from keras import ops

from keras_fam.checks import check_int, check_known_arguments
from keras_fam.models.presets import (
    gemma,
    gemma3,
    gpt2,
    llama,
    mistral,
    phi3,
    qwen,
    qwen3,
)

FAMILIES = {
    "gemma": (gemma, ("GemmaBackbone",)),
    "gemma3": (gemma3, ("Gemma3Backbone",)),
    "llama": (llama, ("LlamaBackbone", "Llama3Backbone")),
    "mistral": (mistral, ("MistralBackbone",)),
    "phi3": (phi3, ("Phi3Backbone",)),
    "qwen": (qwen, ("QwenBackbone",)),
    "qwen3": (qwen3, ("Qwen3Backbone",)),
    "gpt2": (gpt2, ("GPT2Backbone",)),
}
# FAM weights that no original weight fills: the summary embeddings, and the
# Random State Passing buffer (training state, not a parameter).
NEW_WEIGHTS = ("fam_summary_embedding",)
NEW_STATE_PREFIXES = ("state_passing/", "stream_passing/", "position_offset/")
FAM_ARGUMENTS = ("block_size", "memory_segments", "fam_length")


def supported_families():
    """`"family (KerasHub classes)"` strings, for messages and docs."""
    return [
        f"{family} ({', '.join(classes)})"
        for family, (_, classes) in FAMILIES.items()
    ]


def adapter_for(backbone_cls, preset=None):
    """The adapter module of a KerasHub backbone class, or a `ValueError`
    listing the supported families."""
    for adapter, classes in FAMILIES.values():
        if (
            backbone_cls.__name__ in classes
            and backbone_cls.__module__.startswith("keras_hub.")
        ):
            return adapter
    raise ValueError(
        f"Preset {preset!r} holds a `{backbone_cls.__name__}`, a model family "
        "that keras_fam cannot convert to TransformerFAM. Supported families: "
        f"{'; '.join(supported_families())}."
    )


def _check_overrides(overrides, backbone_cls=None):
    """Checks the override names and the FAM arguments before anything is
    loaded (the backbone would check them too, but only after the original
    model is loaded): a misspelled override is an error, not ignored."""
    from keras_fam.models.fam_backbone import BACKBONE_ARGUMENTS

    known = set(BACKBONE_ARGUMENTS)
    if backbone_cls is not None:
        known |= set(inspect.signature(backbone_cls.__init__).parameters)
        known -= {"self", "args", "kwargs"}
    check_known_arguments("from_preset", overrides, known)
    for name in FAM_ARGUMENTS:
        if overrides.get(name) is not None:
            minimum = 1 if name == "block_size" else 0
            check_int(name, overrides[name], minimum=minimum)


# Errors of reading a broken preset file (JSON, HDF5, safetensors, zip),
# re-raised as a `ValueError` that names the preset and its files.
_FILE_ERRORS = (OSError, EOFError, KeyError, UnicodeDecodeError)
_FILE_ERROR_NAMES = ("SafetensorError", "BadZipFile", "JSONDecodeError")


def _check_json_files(preset):
    """Every JSON file of a local preset directory parses (else a
    `ValueError` naming the file)."""
    if not isinstance(preset, str) or not os.path.isdir(preset):
        return
    for name in sorted(os.listdir(preset)):
        path = os.path.join(preset, name)
        if not name.endswith(".json") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                value = json.load(file)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"Preset {preset!r}: the file {path} is not valid JSON "
                f"(corrupt or truncated: {error})."
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"Preset {preset!r}: the file {path} must hold a JSON "
                f"object. Received: a JSON {type(value).__name__}"
            )


@contextlib.contextmanager
def reading_preset(preset):
    """A context for KerasHub's preset loaders: corrupt or truncated files
    give a `ValueError` naming the preset and the file, not a raw JSON,
    HDF5, safetensors or NumPy error."""
    _check_json_files(preset)
    try:
        yield
    except Exception as error:
        if not isinstance(error, _FILE_ERRORS) and (
            type(error).__name__ not in _FILE_ERROR_NAMES
        ):
            raise
        files = ""
        if isinstance(preset, str) and os.path.isdir(preset):
            weights = sorted(
                name
                for name in os.listdir(preset)
                if name.endswith((".h5", ".safetensors", ".json"))
            )
            files = f" (files: {', '.join(weights)})"
        detail = str(error)
        if "allow_pickle" in detail or not detail:
            detail = "unreadable data"
        raise ValueError(
            f"Could not load preset {preset!r}{files}: a file is corrupt, "
            f"truncated or not of the expected format "
            f"({type(error).__name__}: {detail})."
        ) from None


def _check_dtype(dtype):
    """A float dtype policy name or object, or a `ValueError` that names
    `dtype` (KerasHub's own messages for integer and unknown dtypes do
    not)."""
    if dtype is None:
        return None
    try:
        policy = keras.dtype_policies.get(dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`dtype` must be a float dtype policy such as 'float32', "
            f"'bfloat16' or 'mixed_bfloat16'. Received: dtype={dtype!r} "
            f"({error})"
        ) from error
    variable_dtype = policy.variable_dtype
    if (
        getattr(policy, "quantization_mode", None)
        or variable_dtype is None
        or "float" not in str(variable_dtype)
    ):
        raise ValueError(
            "`dtype` must be a float dtype policy such as 'float32', "
            "'bfloat16' or 'mixed_bfloat16' (weights are copied from the "
            "preset, quantized and integer policies are not supported). "
            f"Received: dtype={dtype!r}"
        )
    return dtype


def _loader(preset):
    from keras_hub.src.utils.preset_utils import get_preset_loader

    return get_preset_loader(preset)


def _is_fam(backbone_cls):
    from keras_fam.models.fam_backbone import FAMBackbone

    return isinstance(backbone_cls, type) and issubclass(
        backbone_cls, FAMBackbone
    )


def convert_backbone(
    original, cls=None, dtype=None, load_weights=True, **overrides
):
    """A `FAMBackbone` with the architecture and weights of a loaded
    KerasHub backbone.

    Args:
        original: a KerasHub backbone of a supported family.
        cls: the class to build, `FAMBackbone` or a subclass. Defaults to
            `FAMBackbone`.
        dtype: dtype policy of the FAM model. Defaults to the original's.
        load_weights: bool. Copy the weights (else fresh initialisation).
        **overrides: `FAMBackbone` arguments the preset does not fix
            (`block_size`, `memory_segments`, `fam_length`, `dropout`...).

    Returns:
        A `keras_fam.models.FAMBackbone`.
    """
    if cls is None:
        from keras_fam.models.fam_backbone import FAMBackbone as cls

    adapter = adapter_for(type(original))
    config = adapter.convert_config(original)
    fixed = sorted(set(overrides) & set(config))
    if fixed:
        received = {name: overrides[name] for name in fixed}
        raise ValueError(
            f"{fixed} are read from the preset and cannot be overridden when "
            "converting it. Overridable: the FAM and training arguments "
            f"({', '.join(FAM_ARGUMENTS)}, dropout, "
            "state_passing_probability, ...). "
            f"Received: {received}"
        )
    _check_overrides(overrides)
    if dtype is None:
        dtype = original.dtype_policy.name
    backbone = cls(**config, **overrides, dtype=dtype)
    if load_weights:
        transfer_weights(adapter.weight_map(original), original, backbone)
    return backbone


def transfer_weights(mapping, original, backbone):
    """Copy weights along `mapping` (`{fam path: (original path,
    transform)}`); every original weight must be used and every FAM weight
    filled except the new ones (`NEW_WEIGHTS`)."""
    sources = {variable.path: variable for variable in original.weights}
    targets = {
        variable.path: variable
        for variable in backbone.weights
        if not variable.path.startswith(NEW_STATE_PREFIXES)
    }
    for target_path, (source_path, transform) in mapping.items():
        if source_path not in sources or target_path not in targets:
            owner = "FAM model" if source_path in sources else "original"
            raise ValueError(
                f"Cannot map the {type(original).__name__} weight "
                f"{source_path!r} to the FAM weight {target_path!r}: the "
                f"{owner} has no such weight."
            )
        value = ops.convert_to_numpy(sources.pop(source_path))
        if transform is not None:
            value = transform(value)
        target = targets.pop(target_path)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"The {type(original).__name__} weight {source_path!r} has "
                f"shape {tuple(value.shape)} after mapping; the FAM weight "
                f"{target_path!r} has shape {tuple(target.shape)}."
            )
        target.assign(value)
    unused = sorted(sources)
    unfilled = sorted(
        path for path in targets if path.split("/")[-1] not in NEW_WEIGHTS
    )
    if unused or unfilled:
        raise ValueError(
            f"Incomplete weight mapping from {type(original).__name__}: "
            f"original weights not used: {unused}; FAM weights not filled: "
            f"{unfilled}."
        )


def backbone_from_preset(cls, preset, dtype=None, load_weights=True, **kwargs):
    """`FAMBackbone.from_preset`: see the module docstring."""
    from keras_hub.models import Backbone

    _check_overrides(kwargs, cls)
    dtype = _check_dtype(dtype)
    with reading_preset(preset):
        backbone_cls = _loader(preset).check_backbone_class()
        if _is_fam(backbone_cls):
            # Already a FAM preset: KerasHub's own loader; `kwargs` override
            # config entries (block_size, memory_segments...).
            return Backbone.from_preset.__func__(
                cls, preset, load_weights=load_weights, dtype=dtype, **kwargs
            )
        adapter_for(backbone_cls, preset)
        original = Backbone.from_preset(
            preset, load_weights=load_weights, dtype=dtype
        )
    return convert_backbone(
        original, cls, dtype=dtype, load_weights=load_weights, **kwargs
    )


def causal_lm_from_preset(
    cls, preset, dtype=None, load_weights=True, preprocessor="auto", **kwargs
):
    """`FAMCausalLM.from_preset`: see the module docstring.

    `preprocessor="auto"` loads the preset's own causal LM preprocessor
    (tokenizer included) with KerasHub's
    `CausalLMPreprocessor.from_preset`; pass `None` or a preprocessor to
    override it. Other keyword arguments override backbone arguments.
    """
    _check_overrides(kwargs, cls.backbone_cls)
    dtype = _check_dtype(dtype)
    with reading_preset(preset):
        return _causal_lm_from_preset(
            cls, preset, dtype, load_weights, preprocessor, **kwargs
        )


def _causal_lm_from_preset(
    cls, preset, dtype, load_weights, preprocessor, **kwargs
):
    from keras_hub.models import CausalLM, CausalLMPreprocessor

    loader = _loader(preset)
    backbone_cls = loader.check_backbone_class()
    if _is_fam(backbone_cls):
        task_kwargs = {}
        if preprocessor != "auto":
            task_kwargs["preprocessor"] = preprocessor
        if kwargs:
            task_kwargs["backbone"] = backbone_from_preset(
                backbone_cls,
                preset,
                dtype=dtype,
                load_weights=load_weights,
                **kwargs,
            )
        return CausalLM.from_preset.__func__(
            cls, preset, load_weights=load_weights, dtype=dtype, **task_kwargs
        )
    backbone = backbone_from_preset(
        cls.backbone_cls,
        preset,
        dtype=dtype,
        load_weights=load_weights,
        **kwargs,
    )
    if preprocessor == "auto":
        preprocessor = CausalLMPreprocessor.from_preset(preset)
    return cls(backbone=backbone, preprocessor=preprocessor)
