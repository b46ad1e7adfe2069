"""refusal_rank: the library behind the notebooks of "Making refusal robust to linear-ablation attacks".

One module per idea: ``data`` (prompt sets, splits), ``models`` (loading, family facts), ``activations``
(nnsight reads and patches), ``directions`` (difference in means, selection), ``ablation`` (weight
orthogonalisation), ``generation``, ``metrics``, ``plotting``, ``bench``; ``pipeline`` strings them into
the notebooks' steps.
"""
__version__ = "0.1.0"
