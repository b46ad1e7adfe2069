"""The README's results block is generated from the committed summary, never typed by hand."""
from refusal_rank.report import readme_block, render
from refusal_rank.results import read_summary


def test_readme_results_block_matches_summary():
    if not read_summary("cpu"):
        return  # no committed cpu results yet: the block is empty by construction
    assert readme_block("cpu") == render("cpu"), "run: python -m refusal_rank.report --profile cpu --write-readme"


def test_headline_table_bolds_k_star_and_puts_ce_and_the_paper_beside_it():
    from refusal_rank.report import headline_table
    det = lambda kb, ce, reached: {"k_break": kb, "ce_k": kb or reached, "ce_harmless_at_k": ce, "info": {"k_reached": reached}}
    s = {"k_break": {"base": {"iterated": 1, "dim-svd": 2}, "base_star": 1,
                     "defended": {"iterated": None, "dim-svd": None}, "defended_star": None},
         "sweep_details": {"base": {"iterated": det(1, 0.41, 1), "dim-svd": det(2, 0.39, 2)},
                           "defended": {"iterated": det(None, 0.5, 16), "dim-svd": det(None, 0.6, 32)}},
         "sweep_ce_no_ablation": {"base": 0.392, "defended": 0.433}, "sweep_config": {"threshold": 0.3}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in headline_table(s).splitlines() if line.startswith("| ")}
    assert "| 1 | 2 | **1** | 0.410 (0.392) | 1 |" in rows["base"]
    assert "| > 16 | > 32 | **> 16** | n/a (0.433) | >= 16 |" in rows["defended"]
