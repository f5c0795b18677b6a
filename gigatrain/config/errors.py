"""ConfigError: every configuration problem as one readable paragraph."""
from __future__ import annotations




class ConfigError(ValueError):
    """A configuration problem. `str(err)` is one paragraph saying what is wrong and what to
    change; `err.problems` holds the individual sentences."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [_one_line(p) for p in problems]
        self.source = source
        head = f"Invalid configuration ({source}): " if source else "Invalid configuration: "
        super().__init__(head + " ".join(self.problems))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "?", "!")) else text + "."


class _Problems(ValueError):
    """Raised by the cross-field validators: carries every problem found, so that pydantic's
    error (which keeps the original exception in `ctx`) can be turned back into a list."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(" ".join(problems))
