"""Pieces shared by the benchmark scripts: model sizes, the KerasHub anchor,
per-backend compilation, interleaved timing, memory and thread settings.

Not a benchmark; imported by the scripts next to it (run them as
`python benchmarks/<script>.py`, which puts this folder on `sys.path`).
"""

import statistics
import time

import keras

# The width-256, 4-layer model of issue 12 (generate, per-token and
# streaming benchmarks), and KerasHub's Llama of the same size.
SIZES = dict(
    vocabulary_size=4096,
    num_layers=4,
    num_heads=4,
    hidden_dim=256,
    intermediate_dim=1024,
)
FAM_OPTIONS = dict(block_size=256, memory_segments=1, fam_length=16)

# The small model streamed over long documents (`benchmark_score_memory.py`,
# `benchmark_soak.py`).
SMALL_CONFIG = dict(
    vocabulary_size=256,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=128,
    block_size=128,
    memory_segments=1,
    fam_length=8,
)

MIN_SECONDS = 0.5


def fam_lm(**overrides):
    from keras_fam.models import FAMBackbone, FAMCausalLM

    return FAMCausalLM(FAMBackbone(**{**SIZES, **FAM_OPTIONS, **overrides}))


def llama_lm():
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=SIZES["vocabulary_size"],
        num_layers=SIZES["num_layers"],
        num_query_heads=SIZES["num_heads"],
        num_key_value_heads=SIZES["num_heads"],
        hidden_dim=SIZES["hidden_dim"],
        intermediate_dim=SIZES["intermediate_dim"],
    )
    return keras_hub.models.LlamaCausalLM(backbone)


def set_torch_threads(threads):
    """`torch.set_num_threads(threads)` on the PyTorch backend (1 avoids
    the thread-barrier stalls of eager ops on an oversubscribed CPU)."""
    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


def add_torch_threads_argument(parser):
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads (`torch.set_num_threads`); 1 avoids "
        "thread-barrier stalls of eager ops on an oversubscribed CPU",
    )


def versions():
    """Backend and library versions, for the results file."""
    import platform

    backend = keras.backend.backend()
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[
        backend
    ]
    version = __import__(module).__version__
    return {
        "backend": backend,
        "backend_version": version,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def load_average():
    try:
        with open("/proc/loadavg") as file:
            return file.read().split()[0]
    except OSError:
        return "?"


def available_bytes():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30


def compile_function(model, function):
    """`function(*args)` compiled for the current backend, reading the
    variables of `model`: `jax.jit` (variables passed through a
    `keras.StatelessScope`), `tf.function(jit_compile=True)`, PyTorch eager
    under `torch.no_grad()`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        variables = model.variables

        def pure(values, *args):
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                return function(*args)

        jitted = jax.jit(pure)
        return lambda *args: jitted([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    import torch

    def eager(*args):
        with torch.no_grad():
            return function(*args)

    return eager


def block_until_ready(tree):
    """Wait until every array of `tree` is computed (JAX dispatches
    asynchronously; TensorFlow and PyTorch on CPU return finished
    tensors)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(tree)
    return tree


def interleaved(cases, repeats, min_seconds=MIN_SECONDS, warmup=1):
    """Time `cases` (`{key: fn}`, each `fn()` one call): `warmup` untimed
    calls each, then `repeats` rounds timing every case once, each round
    starting one case later (so that load from other processes, and the
    caches a case leaves behind, fall on all cases alike). A timing repeats
    its call for at least `min_seconds` (`0`: exactly one call). Returns
    `{key: [seconds per call, one per round]}`."""
    keys = list(cases)
    if not keys:  # Every case was skipped (out of memory).
        return {}
    for key in keys:
        for _ in range(warmup):
            cases[key]()
    times = {key: [] for key in keys}
    for turn in range(repeats):
        shift = turn % len(keys)
        for key in keys[shift:] + keys[:shift]:
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < min_seconds:
                cases[key]()
                calls += 1
            times[key].append((time.perf_counter() - start) / calls)
    return times


def median(values):
    return statistics.median(values)
