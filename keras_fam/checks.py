"""Argument checks shared by every keras_fam layer and model.

Each raises early, naming the parameter, the value received and what is
allowed (`ValueError("... Received: block_size=0")`, as in Keras).
"""


def check_int(name, value, minimum=1):
    """`value` is a Python int (not a bool) `>= minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        if minimum == 1:
            allowed = "a positive integer"
        elif minimum == 0:
            allowed = "a non-negative integer"
        else:
            allowed = f"an integer >= {minimum}"
        raise ValueError(
            f"`{name}` must be {allowed}. Received: {name}={value!r}"
        )


def check_bool(name, value):
    """`value` is a Python bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")


def check_choice(name, value, choices):
    """`value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. "
            f"Received: {name}={value!r}"
        )


def check_probability(name, value):
    """`value` is a float (or int) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1]. Received: {name}={value}"
        )


def shapes_match(received, expected):
    """Equal shapes where `None` (an unknown size) matches anything."""
    return len(received) == len(expected) and all(
        r is None or e is None or r == e
        for r, e in zip(received, expected, strict=True)
    )
