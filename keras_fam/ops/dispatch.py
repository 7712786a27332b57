"""Backend dispatch: the only module that imports jax, tensorflow or torch.

Two operations are dispatched per backend, each with a pure `keras.ops`
reference path that the tests compare against:

- `attention`: softmax attention of grouped queries over keys with a boolean
  mask. JAX uses `jax.nn.dot_product_attention`, PyTorch
  `scaled_dot_product_attention`; TensorFlow (and any call with logit
  soft-capping, which neither fused kernel supports) uses the reference einsum
  path, which XLA compiles well.
- `scan`: the loop over blocks. `lax.scan` on JAX (a Python loop when called
  eagerly, where `lax.scan` would recompile its body on every call),
  `tf.scan` on TensorFlow (it compiles with `jit_compile=True` and has
  gradients, which `keras.ops.scan`'s `while_loop` lacks under XLA), a Python
  loop on PyTorch.

`no_grad` turns off PyTorch's recording of autograd graphs (for scoring
long documents chunk by chunk); the other backends record none unasked.

Backend modules are imported inside the functions, so importing this module
never imports a backend that is not the active one.

Shape letters: B batch, Q query length, K key length, N query heads,
G key/value heads, H head dim.
"""

import contextlib

import keras
from keras import ops

from keras_fam.checks import check_choice

IMPLEMENTATIONS = ("auto", "reference")


def check_implementation(implementation, name="implementation"):
    """`implementation` is one of `IMPLEMENTATIONS`."""
    check_choice(name, implementation, IMPLEMENTATIONS)


def attention_reference(query, key, value, mask, scale, logit_soft_cap=None):
    """Masked softmax attention with `keras.ops` only.

    Args:
        query: `(B, Q, N, H)` tensor.
        key: `(B, K, G, H)` tensor, `N` a multiple of `G`.
        value: `(B, K, G, H)` tensor.
        mask: bool `(B, Q, K)` tensor, `True` where a query may attend.
        scale: float. Multiplies the logits.
        logit_soft_cap: float or `None`. If set, logits become
            `cap * tanh(logits / cap)` before masking.

    Returns:
        `(B, Q, N, H)` tensor in the dtype of `query`.
    """
    batch, length, heads, head_dim = ops.shape(query)
    probs = _probabilities(query, key, mask, scale, logit_soft_cap)
    out = ops.einsum("bgnqk,bkgh->bqgnh", ops.cast(probs, value.dtype), value)
    return ops.reshape(out, (batch, length, heads, head_dim))


def _probabilities(query, key, mask, scale, logit_soft_cap):
    """float32 attention weights `(B, G, N // G, Q, K)`."""
    batch, length, heads, head_dim = ops.shape(query)
    groups = ops.shape(key)[2]
    query = ops.reshape(
        query, (batch, length, groups, heads // groups, head_dim)
    )
    logits = ops.einsum("bqgnh,bkgh->bgnqk", query, key)
    logits = ops.cast(logits, "float32") * scale
    if logit_soft_cap is not None:
        logits = ops.tanh(logits / logit_soft_cap) * logit_soft_cap
    logits = ops.where(mask[:, None, None, :, :], logits, -1e30)
    return ops.softmax(logits, axis=-1)


def attention_mass(query, key, mask, columns, scale, logit_soft_cap=None):
    """How much of each query's attention falls on some key columns.

    Args:
        query, key, mask, scale, logit_soft_cap: as in
            `attention_reference` (`value` is not needed).
        columns: bool NumPy array `(K,)`, the columns to sum.

    Returns:
        float32 `(B, Q)`: the softmax mass on `columns`, averaged over the
        query heads.
    """
    batch, length, heads, _ = ops.shape(query)
    probs = _probabilities(query, key, mask, scale, logit_soft_cap)
    mass = ops.sum(ops.where(columns, probs, 0.0), axis=-1)  # (B, G, n, Q)
    return ops.mean(ops.reshape(mass, (batch, heads, length)), axis=1)


def attention(
    query,
    key,
    value,
    mask,
    scale,
    logit_soft_cap=None,
    implementation="auto",
):
    """Fused masked attention, dispatched to the backend's kernel.

    Same arguments and result as `attention_reference`; `implementation`
    is `"auto"` (the backend kernel) or `"reference"` (`keras.ops` only).
    """
    check_implementation(implementation)
    backend = keras.backend.backend()
    if implementation == "reference" or logit_soft_cap is not None:
        return attention_reference(
            query, key, value, mask, scale, logit_soft_cap
        )
    if backend == "jax":
        import jax

        return jax.nn.dot_product_attention(
            query, key, value, mask=mask[:, None], scale=scale
        )
    if backend == "torch":
        from torch.nn.functional import scaled_dot_product_attention

        groups_differ = query.shape[2] != key.shape[2]
        out = scaled_dot_product_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=mask[:, None],
            scale=scale,
            enable_gqa=groups_differ,
        )
        return out.transpose(1, 2)
    return attention_reference(query, key, value, mask, scale, logit_soft_cap)


def scan(fn, init, xs, ys_like, implementation="auto"):
    """Loop `fn(carry, x) -> (carry, y)` over the leading axis of `xs`.

    Args:
        fn: the step function. `carry`, `x` and `y` are nested structures
            (tuples or dicts) of tensors.
        init: the initial carry.
        xs: a structure of tensors, all with the same leading length.
        ys_like: a structure of tensors with the shape and dtype of one `y`
            (TensorFlow's `tf.scan` needs it as an initializer; others ignore
            it).
        implementation: `"auto"` or `"reference"` (`keras.ops.scan`).

    Returns:
        `(final_carry, ys)` with `ys` stacked along a new leading axis.
    """
    check_implementation(implementation)
    backend = keras.backend.backend()
    if implementation == "reference":
        return ops.scan(fn, init, xs)
    if backend == "jax":
        import jax

        leaves = keras.tree.flatten((init, xs))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return jax.lax.scan(fn, init, xs)
        # Eager: `lax.scan` would trace and compile the body on every call;
        # op-by-op dispatch of a Python loop is several times faster.
        return _python_loop(fn, init, xs, jax.numpy.stack)
    if backend == "tensorflow":
        import tensorflow as tf

        def step(accumulated, x):
            carry, _ = accumulated
            return fn(carry, x)

        carries, ys = tf.scan(step, xs, initializer=(init, ys_like))
        final = tf.nest.map_structure(lambda t: t[-1], carries)
        return final, ys
    if backend == "torch":
        import torch

        return _python_loop(fn, init, xs, torch.stack)
    return ops.scan(fn, init, xs)


def _python_loop(fn, init, xs, stack):
    flat_xs = keras.tree.flatten(xs)
    carry, ys = init, []
    for index in range(flat_xs[0].shape[0]):
        x = keras.tree.pack_sequence_as(xs, [t[index] for t in flat_xs])
        carry, y = fn(carry, x)
        ys.append(y)
    return carry, keras.tree.map_structure(lambda *t: stack(t), *ys)


def static_int(tensor):
    """The value of a scalar integer tensor if it is known at trace time.

    Returns a Python int for eager tensors and for constants inside a traced
    function (a JAX `jit`, a `tf.function`), and `None` for values that are
    only known at run time.
    """
    if isinstance(tensor, int):
        return tensor
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        value = tf.get_static_value(tensor)
        return None if value is None else int(value)
    if backend == "jax":
        import jax

        if isinstance(tensor, jax.core.Tracer):
            return None
    return int(ops.convert_to_numpy(tensor))


def no_grad(enabled=True):
    """A context in which no gradient graph is recorded: PyTorch's
    `torch.no_grad()` (a layer called outside it keeps every activation
    alive for autograd); on JAX and TensorFlow, which record nothing
    outside a transform or a tape, a context that does nothing."""
    if enabled and keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
