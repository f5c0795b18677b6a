"""The README's config reference is the one the schema generates."""
from pathlib import Path

from gigatrain.config import config_reference
import pytest

pytestmark = pytest.mark.rung0


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == config_reference().strip(), \
        "README config reference is stale: run `python scripts/update_readme_reference.py`"


def test_every_example_config_resolves():
    from gigatrain.config import load_config, resolve_for_world
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(str(path), [])
        resolve_for_world(cfg, cfg.nproc or 1)
