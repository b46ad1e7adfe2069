"""refusal_rank: the library behind the notebooks of "Making refusal robust to linear-ablation attacks".

One module per idea: ``data`` (prompt sets, splits), ``models`` (loading, family facts), ``activations``
(nnsight reads and patches), ``directions`` (difference in means, selection), ``ablation`` (weight
orthogonalisation), ``generation``, ``metrics``, ``plotting``, ``bench``; ``pipeline`` strings them into
the notebooks' steps.
"""
__version__ = "0.1.0"

import warnings as _warnings

# Two notices of the pinned stack that say nothing about a run, handled once here so that a notebook
# shows none (every other warning still shows):
# - peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` whenever it wraps a model;
# - nnsight reports an open ``tracer.iter[:]`` generation loop that ended because every row reached EOS,
#   which is how ``generation`` ends a patched generation on purpose (what the loop saved is kept).
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"'[^']*' was never reached: the loop asked for a step the run did not make",
                         category=UserWarning)
