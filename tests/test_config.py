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


def test_default_variants_follow_defense_run_and_reject_unknown():
    import copy

    from refusal_rank.defense_run import default_variants, variant_dir
    cfg = copy.deepcopy(load_config("tiny"))
    cfg["defense"].pop("run", None)
    assert default_variants(cfg) == list(cfg["defense"]["variants"])
    before = variant_dir(cfg, "kl_only")
    cfg["defense"]["run"] = ["kl_only"]
    assert default_variants(cfg) == ["kl_only"]
    assert variant_dir(cfg, "kl_only") == before  # choosing what runs does not retrain anything
    cfg["defense"]["run"] = ["nope"]
    with pytest.raises(ValueError, match="unknown variant"):
        default_variants(cfg)


def test_auto_dtype_resolves_to_what_this_cpu_multiplies_fastest():
    """'auto' never reaches a cache key: it is replaced by the measured choice, and the request is kept."""
    from refusal_rank.config import load_config

    cfg = load_config("cpu")
    assert cfg["model"]["dtype"] in ("bfloat16", "float32") and cfg["model"]["dtype_requested"] == "auto"
    assert load_config("cpu")["model"]["dtype"] == cfg["model"]["dtype"]  # one measurement a process


def test_kernel_only_knobs_key_no_cache():
    """gen_pack_weights chooses a kernel whose outputs differ at most at bf16 rounding (test_generation: bit
    for bit on tiny), so no cache key holds it; any other eval knob does."""
    import copy

    from refusal_rank.config import config_hash

    cfg = load_config("tiny")
    flipped = copy.deepcopy(cfg)
    flipped["eval"]["gen_pack_weights"] = not cfg["eval"]["gen_pack_weights"]
    assert config_hash(flipped, "eval") == config_hash(cfg, "eval") and config_hash(flipped) == config_hash(cfg)
    flipped["eval"]["gen_engine"] = "hf"
    assert config_hash(flipped, "eval") != config_hash(cfg, "eval")
