"""environment.yml and pyproject.toml pin the same stack."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps)
    env = dict(re.findall(r"^\s+- ([A-Za-z0-9_.-]+)==([^\s]+)$", (ROOT / "environment.yml").read_text(), re.M))
    for name, version in pins.items():
        assert env.get(name) == version, f"{name}: pyproject {version}, environment.yml {env.get(name)}"
