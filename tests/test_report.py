"""The README's results block is generated from the committed summary, never typed by hand."""
from refusal_rank.report import readme_block, render
from refusal_rank.results import read_summary


def test_readme_results_block_matches_summary():
    if not read_summary("cpu"):
        return  # no committed cpu results yet: the block is empty by construction
    assert readme_block("cpu") == render("cpu"), "run: python -m refusal_rank.report --profile cpu --write-readme"
