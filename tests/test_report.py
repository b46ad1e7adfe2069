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


def test_readme_progress_block_matches_the_committed_progress_file():
    from refusal_rank.report import render_progress

    body = render_progress("cpu")
    if not body:
        return  # no committed progress file: nothing to show
    assert readme_block("cpu", "progress") == body, "run: python -m refusal_rank.report --profile cpu --write-readme"


def test_progress_table_counts_hand_labels_of_the_same_checkpoint_only():
    """A checkpoint's hand count comes from the labels of that checkpoint (folder, step and snapshot digest)
    under the re-selected K=1 attack, old " (screen)" rows included; another step or digest never counts."""
    from refusal_rank.report import progress_table

    rate = lambda r: {"rate": r, "lo": 0.0, "hi": 1.0, "n": 160}
    entry = lambda step, sha, left: {"step": step, "snapshot_sha256": sha, "refusal_rate_harmful": rate(0.7625),
                                     "refusal_rate_harmless": rate(0.0078), "overrefusal_rate": rate(0.0156),
                                     "kl_harmless": {"mean": 0.14402}, "ce_harmless": 0.37864,
                                     "screen": {"k_break": 1, "k1_reselected": {
                                         "refusal_rate_harmful": rate(left), "filter_fallback": {"harmful_val": 14},
                                         "direction": {"layer": 20, "fallback": True, "kl_harmless": 0.0776}}}}
    doc = {"read_at_commit": "abc1234", "original": {"dtype": "bfloat16", "refusal_rate_harmful": rate(0.6438)},
           "variants": {"v": {"dir": "v-0123", "dtype": "bfloat16", "milestones": [70, 140],
                              "budget": {"1x": entry(70, "a" * 64, 0.0125), "2x": entry(140, "b" * 64, 0.269)}}}}
    lab = lambda ckpt, refusal, attack="k1_reselected": {"checkpoint": ckpt, "attack": attack, "refusal": refusal}
    labels = ([lab("v-0123@70:" + "a" * 12, True)] * 3 + [lab("v-0123@70:" + "a" * 12, False, "k1_reselected (screen)")] * 2
              + [lab("v-0123@70:" + "c" * 12, True)] * 5  # another snapshot under the same folder and step
              + [lab("v-0123@140:" + "a" * 12, True)] * 7  # another step
              + [lab("v-0123@70:" + "a" * 12, True, "dim-svd@4")] * 4)  # another attack
    rows = [l for l in progress_table(doc, labels).splitlines() if l.startswith("| `v`")]
    assert rows[0].split(" | ")[1:9] == ["1x (70)", "0.763", "0.008", "0.016", "0.144", "0.379", "0.013; 3/5",
                                          "fallback (KL 0.078), layer 20; starved filter: harmful_val 14 passed"]
    assert "| 0.269 |" in rows[1]  # no label of this checkpoint: no count


def test_probes_line_reports_the_scale_free_counts_and_the_reading():
    from refusal_rank.report import probes_line

    s = {"probes_site": {"base": {"layer": 20}, "m": {"layer": 21}},
         "probes": {"base": {"20": {"linear_acc": 0.996, "k_erase": 4, "k_erase_budget": 48, "whitened": {"n_sig": 9}}},
                    "m": {"21": {"linear_acc": 0.983, "k_erase": None, "k_erase_budget": 48, "whitened": {"n_sig": 4}}}},
         "probes_last_token": {"base": {"linear_acc": 0.983}, "m": {"linear_acc": 0.979}},
         "probes_reading": {"m": {"case": "concentrated"}}}
    line = probes_line(s)
    assert ("base (layer 20): held-out linear probe 0.996, last-token probe 0.983, k_erase 4, whitened eigenvalues "
            "above the noise edge 9;") in line
    assert "m (layer 21): held-out linear probe 0.983, last-token probe 0.979, k_erase > 48, whitened eigenvalues above " \
           "the noise edge 4, read as concentrated." in line
    assert "k_chance" not in line


def test_progress_table_lists_the_k_the_screen_tried():
    """A screen K_break of 4 after K = 1, 2 and 4 shows them, so that a reader sees K = 3 untried."""
    from refusal_rank.report import _screen_k

    assert _screen_k({"k_break": 4, "k_screened": [1, 2, 4]}) == "4 (1, 2, 4)"
    assert _screen_k({"k_break": 1, "k_screened": [1]}) == "1"
    assert _screen_k({}) == ""
