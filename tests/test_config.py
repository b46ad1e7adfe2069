import pytest

from refusal_rank.config import ProfileError, available_profiles, load_config


def test_profiles_have_every_section():
    assert {"tiny", "cpu", "cpu-small", "paper"} <= set(available_profiles())
    for name in available_profiles():
        cfg = load_config(name)
        for section in ("model", "data", "directions", "eval"):
            assert section in cfg, (name, section)
        assert cfg["model"]["source"] in {"tiny", "pypi_gguf", "hub"}


def test_unknown_profile_is_clear():
    with pytest.raises(ProfileError, match="Unknown profile 'gpu9'.*choose one of"):
        load_config("gpu9")


def test_env_variable_selects_profile(monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_PROFILE", "tiny")
    assert load_config()["profile"] == "tiny"
