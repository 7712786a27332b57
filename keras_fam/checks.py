"""Argument and input checks shared by every keras_fam layer and model.

Each raises early, naming the parameter, the value received and what is
allowed (`ValueError("... Received: block_size=0")`, as in Keras). Argument
checks raise `ValueError` for a value of the wrong kind too (as Keras'
layers do); tensors of the wrong dtype raise `TypeError`. Every legal
spelling is accepted: NumPy integer and float scalars (`np.int64(4)`), and
the checks return the plain Python value, so that configs stay
JSON-serialisable.

Values of tensors (token ids, padding masks) can only be checked where they
are known: in eager calls and in the Python entry points (`generate`,
`score`, `stream`, `FAMStreamer.feed`). Inside a compiled function (`jit`,
`tf.function`, a compiled `fit` step) a tensor has no value yet; `concrete`
returns `None` there and the value checks are skipped (see the README's
"Inputs" section for what that means for each check).
"""

import difflib
import math
import numbers

import keras
import numpy as np
from keras import ops


def check_int(name, value, minimum=1, maximum=None):
    """`value` is an integer (a Python or NumPy integer, not a bool) in
    `[minimum, maximum]` (`None`: unbounded); returns it as a Python int."""
    if minimum is None:
        allowed = "an integer"
    elif minimum == 1:
        allowed = "a positive integer"
    elif minimum == 0:
        allowed = "a non-negative integer"
    else:
        allowed = f"an integer >= {minimum}"
    if maximum is not None:
        allowed += f" <= {maximum}"
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )
    return int(value)


def check_float(
    name, value, minimum=None, maximum=None, above=None, below=None
):
    """`value` is a finite real number (not a bool, not NaN) with
    `minimum <= value <= maximum` and `above < value < below` (each bound
    optional); returns it as a Python float."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if above is not None:
        bounds.append(f"> {above}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    if below is not None:
        bounds.append(f"< {below}")
    allowed = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, numbers.Real
    ):
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )
    value_float = float(value)
    if (
        not math.isfinite(value_float)
        or (minimum is not None and value_float < minimum)
        or (maximum is not None and value_float > maximum)
        or (above is not None and value_float <= above)
        or (below is not None and value_float >= below)
    ):
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )
    return value_float


def check_positive(name, value, optional=False):
    """`value` is a finite number `> 0` (or `None` when `optional`)."""
    if optional and value is None:
        return None
    return check_float(name, value, above=0.0)


def check_rate(name, value):
    """A dropout rate: a number in `[0, 1)`."""
    return check_float(name, value, minimum=0.0, below=1.0)


def check_probability(name, value):
    """A probability: a number in `[0, 1]`."""
    return check_float(name, value, minimum=0.0, maximum=1.0)


def check_bool(name, value):
    """`value` is a bool (Python or NumPy); returns a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return bool(value)


def check_choice(name, value, choices):
    """`value` is one of `choices`."""
    if value not in tuple(choices):
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value


def get_initializer(value, name="kernel_initializer"):
    """`keras.initializers.get(value)`, or a `ValueError` naming `name`."""
    try:
        return keras.initializers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be a Keras initializer or its name. "
            f"Received: {name}={value!r}"
        ) from error


def get_activation(value, name="activation"):
    """The activation function `value` names: a Keras activation or
    `"gelu_approximate"` (tanh-approximated GELU); else a `ValueError`
    naming `name`."""
    if value == "gelu_approximate":
        return lambda x: keras.activations.gelu(x, approximate=True)
    try:
        function = keras.activations.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be a Keras activation name (or "
            f"'gelu_approximate'). Received: {name}={value!r}"
        ) from error
    if not callable(function):
        raise ValueError(
            f"`{name}` must be a Keras activation name (or "
            f"'gelu_approximate'). Received: {name}={value!r}"
        )
    return function


def check_known_arguments(owner, received, known):
    """Every name in `received` is in `known`; else a `ValueError` naming
    the unknown arguments (with the closest known names) so a misspelled
    argument is never silently dropped."""
    unknown = [name for name in received if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), list(known), n=1)
        if close:
            hints.append(f"did you mean `{close[0]}` for `{name}`?")
    if hints:
        hint = f" ({'; '.join(hints)})"
    else:
        hint = f". Allowed: {', '.join(sorted(known))}"
    raise ValueError(
        f"Unknown argument{'s' if len(unknown) > 1 else ''} to {owner}: "
        f"{', '.join(map(str, unknown))}{hint}. Received: "
        + ", ".join(f"{name}={received[name]!r}" for name in unknown)
    )


def check_batch_size(batch_size):
    """`get_initial_state`'s `batch_size`: a positive integer, or a scalar
    integer tensor (`ops.shape(x)[0]` inside a compiled function)."""
    if hasattr(batch_size, "dtype") and hasattr(batch_size, "shape"):
        dtype = keras.backend.standardize_dtype(batch_size.dtype)
        if "int" in dtype and tuple(batch_size.shape) == ():
            value = concrete(batch_size)
            if value is None:
                return batch_size
            batch_size = int(value)
    return check_int("batch_size", batch_size)


def concrete(tensor):
    """The NumPy value of `tensor`, or `None` inside a traced function
    (a JAX tracer, a symbolic TensorFlow tensor, a `KerasTensor`)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, keras.KerasTensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(tensor))
    except Exception:  # Traced: values are checked in eager calls only.
        return None


def check_right_padded(padding_mask, name="padding_mask"):
    """Raises a `ValueError` if a row of the concrete `padding_mask` has a
    padded position (`0`) before a real one (`1`).

    keras_fam's padding contract: a row is its real tokens followed by
    padding (right padding). Blocks, and so FAM updates, are counted from
    position 0 of the row, so padding before a real token would move every
    block boundary of that row. Nothing is checked for a traced mask.
    """
    values = concrete(padding_mask)
    if values is None or values.size == 0 or values.ndim != 2:
        return
    real = values.astype(bool)
    # A 0 followed (anywhere later) by a 1: a real token after padding.
    later_real = np.flip(np.logical_or.accumulate(np.flip(real, 1), 1), 1)
    bad = np.logical_and(~real[:, :-1], later_real[:, 1:])
    if bad.any():
        row = int(np.argwhere(bad.any(axis=1))[0, 0])
        raise ValueError(
            f"`{name}` must be right-padded: in each row the real tokens "
            "(1) come first, then the padding (0). Left padding or gaps "
            "would move the row's block boundaries and FAM updates. Pad "
            "on the right instead. Received: "
            f"{name}[{row}]={real[row].astype(int).tolist()}"
        )


def check_token_ids(token_ids, vocabulary_size, name="token_ids"):
    """Raises a `ValueError` if a concrete id is outside
    `[0, vocabulary_size)` (a compiled embedding lookup would give NaN or
    a clipped row instead of an error)."""
    values = concrete(token_ids)
    if values is None or values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocabulary_size:
        raise ValueError(
            f"`{name}` must be in [0, vocabulary_size={vocabulary_size}). "
            f"Received: {name} with values in [{low}, {high}]"
        )


def shapes_match(received, expected):
    """Equal shapes where `None` (an unknown size) matches anything."""
    return len(received) == len(expected) and all(
        r is None or e is None or r == e
        for r, e in zip(received, expected, strict=True)
    )
