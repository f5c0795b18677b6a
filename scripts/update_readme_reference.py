"""Regenerate the config reference table in README.md from the schema."""
from pathlib import Path

from gigatrain.config import config_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- config-reference:start -->")
_, tail = rest.split("<!-- config-reference:end -->")
readme.write_text(f"{head}<!-- config-reference:start -->\n{config_reference().strip()}\n"
                  f"<!-- config-reference:end -->{tail}")
print(f"updated {readme}")
