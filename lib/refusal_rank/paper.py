"""What the paper under test reports, in one place.

Our numbers are read against these: the README's K_break table, notebook 03's screen figure and notebook 04's
computed reading all take the paper's values from here, so that a correction lands everywhere at once. Each
value is the paper's own (its tables), never one of ours.
"""
from __future__ import annotations

# The ablation rank K the paper reports as breaking each row: the instruct model breaks at K = 1 (Arditi et al.'s
# single direction), its "L1 + KD" row (mean matching, pooled over the prompt tokens) at K = 11, and its headline
# "L2 + KD" row (covariance matching + KD, our `defended`) not before K = 16 (its claim: K_break >= 16).
K_BREAK: dict[str, int] = {"base": 1, "paper_mean": 11, "defended": 16}

# The paper's lower bound for a defended model, which the reading calls meeting or missing the target.
TARGET_K: int = K_BREAK["defended"]

# The variants that carry a mean-matching term: the reading sets each against the paper's L1 + KD row.
MEAN_MATCHING: tuple[str, ...] = ("paper_mean", "mean_matched")

# The README's "paper" column: what the paper says for each of our rows, in words.
K_BREAK_TEXT: dict[str, str] = {
    "base": str(K_BREAK["base"]),
    "defended": f">= {K_BREAK['defended']}",
    "kl_only": "n/a (not reported)",
    "ablation_aware": "n/a (not in the paper)",
    "paper_mean": f"{K_BREAK['paper_mean']} (their L1 mean matching + KD, pooled)",
    "mean_matched": "n/a (ours, not in the paper)",
}

# Reference lines for figures that plot a K_break: label -> K.
K_BREAK_LINES: dict[str, int] = {
    f"paper: instruct ({K_BREAK['base']})": K_BREAK["base"],
    f"paper: L1 + KD ({K_BREAK['paper_mean']})": K_BREAK["paper_mean"],
    f"paper: L2 + KD (>= {K_BREAK['defended']})": K_BREAK["defended"],
}
