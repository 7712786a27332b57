"""Streaming long documents through a FAM model with one fixed-size state.

Kept for compatibility: `FAMState` (`keras_fam.models.fam_state`) and
`FAMStreamer` (`keras_fam.models.fam_streamer`) live next to the models they
drive; `keras_fam.state.FAMState` / `FAMStreamer` are the same classes.
"""

from keras_fam.models.fam_state import SIGNATURE_KEYS, FAMState, model_signature
from keras_fam.models.fam_streamer import OUTPUTS, FAMStreamer

__all__ = [
    "FAMState",
    "FAMStreamer",
    "OUTPUTS",
    "SIGNATURE_KEYS",
    "model_signature",
]
