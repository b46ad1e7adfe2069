"""The `refusal-rank` console script: every subcommand is reachable and fails with one clear sentence."""
from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

import pytest

import refusal_rank
from refusal_rank import cli

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["refusal-rank"].split(":")
    assert module == "refusal_rank.cli" and getattr(cli, func) is cli.main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("run", "figures", "report", "train-variant", "progress", "audit"):
        assert sub in out


def test_run_hands_over_to_run_all_and_keeps_its_exit_status(capsys):
    assert cli.main(["run", "--profile", "nope"]) == 2  # run_all.sh: unknown profile, before installing anything


def test_report_prints_the_headline(capsys):
    assert cli.main(["report", "--profile", "cpu", "--headline"]) == 0
    assert "K\\*_break" in capsys.readouterr().out


def test_train_variant_rejects_an_unknown_variant(capsys):
    assert cli.main(["train-variant", "--profile", "tiny", "--variant", "nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err


def test_progress_of_an_empty_cache_lists_every_variant_and_writes_its_file(tmp_path, monkeypatch, capsys):
    import json

    from refusal_rank.config import RESULTS_ENV, load_config

    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    assert cli.main(["progress", "--profile", "tiny", "--write"]) == 0
    out = capsys.readouterr().out
    names = load_config("tiny")["defense"]["run"]
    assert all(f"{n}: milestones trained none" in out for n in names)
    doc = json.loads((tmp_path / "results" / "tiny" / "queue_progress.json").read_text())
    assert list(doc["variants"]) == names and doc["profile"] == "tiny"
    defense = tmp_path / "cache" / "runs" / "tiny" / "defense"  # reading leaves no empty variant folder behind
    assert not defense.exists() or not any(defense.iterdir())
    # a committed measurement outlives a new, empty cache: written again, the file still holds it, marked
    entry = {"step": 1, "snapshot_sha256": "a" * 64, "refusal_rate_harmful": {"rate": 0.5}, "screen": None}
    doc["variants"][names[0]]["budget"]["1x"] = entry
    (tmp_path / "results" / "tiny" / "queue_progress.json").write_text(json.dumps(doc))
    assert cli.main(["progress", "--profile", "tiny", "--write"]) == 0
    assert f"{names[0]} 1x: carried from the committed file" in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "tiny" / "queue_progress.json").read_text())
    assert again["variants"][names[0]]["budget"]["1x"] == {**entry, "carried_from_commit": doc["read_at_commit"]}
    assert cli.main(["progress", "--profile", "nope"]) == 2


def test_audit_without_its_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "refusal_rank.audit", None)  # as if audit.py were absent
    monkeypatch.delattr(refusal_rank, "audit", raising=False)
    assert cli.main(["audit", "--anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no refusal_rank.audit module" in err and err.count("\n") == 0


def test_audit_dispatches_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("refusal_rank.audit")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "refusal_rank.audit", fake)
    monkeypatch.setattr(refusal_rank, "audit", fake, raising=False)
    assert cli.main(["audit", "--profile", "tiny", "x"]) == 3
    assert seen == [["--profile", "tiny", "x"]]


def test_figures_without_data_is_clear(tmp_path, monkeypatch, capsys):
    from refusal_rank import config as C

    monkeypatch.setattr(C, "REPO_ROOT", tmp_path)
    assert cli.main(["figures", "--profile", "tiny"]) == 1
    assert "no figure data in results/tiny/figure_data/" in capsys.readouterr().err


def test_figures_redraws_tiny(tmp_path, monkeypatch, capsys):
    """The same command on data a tiny run leaves (here: the plotting tests' synthetic figures)."""
    from refusal_rank import config as C
    from refusal_rank import plotting as F

    monkeypatch.setattr(C, "REPO_ROOT", tmp_path)
    cfg = {"profile": "tiny"}
    F.save(F.rate_bars([{"model": "base", "set": "harmful", "rate": 0.0, "lo": 0.0, "hi": 0.1, "n": 8}], "rates"), cfg, "02_4_refusal_rates")
    F.save(F.probe_spectra({"base": [3.0, 1.0, 0.5]}, {"base": {"vals": [2.0, 0.4, -0.1], "edge": 0.5}}, {"base": 2}, 8),
           cfg, "05_2_spectra")
    before = {p.name: p.read_bytes() for p in (tmp_path / "figures" / "tiny").iterdir()}
    for p in (tmp_path / "figures" / "tiny").iterdir():
        p.unlink()
    assert cli.main(["figures", "--profile", "tiny"]) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "figures" / "tiny").iterdir()}
    assert after == before and len(after) == 4
    # a committed figure without values is named, also when the redraw goes elsewhere (--out)
    (tmp_path / "figures" / "tiny" / "01_2_refusal_score_heatmap.png").write_bytes(b"png")
    capsys.readouterr()
    assert cli.main(["figures", "--profile", "tiny", "--out", str(tmp_path / "elsewhere")]) == 0
    err = capsys.readouterr().err
    assert "not redrawn, committed in figures/tiny/" in err and "01_2_refusal_score_heatmap" in err
