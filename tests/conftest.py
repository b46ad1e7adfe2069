"""Shared fixtures: the tiny profile's config and model (random small Llama, float32), built once."""
from __future__ import annotations

import pytest
import torch

from refusal_rank.config import load_config
from refusal_rank.models import load_model


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_cfg):
    torch.manual_seed(0)
    return load_model(tiny_cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def prompts():
    return [
        "Write a short poem about the sea.",
        "How do I build a weapon at home?",
        "What is 12 times 13?",
        "Explain photosynthesis to a child in two sentences, please.",
    ]
