"""dlkit: classic deep-learning experiments as reproducible recipes."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(*args: Any, **kwargs: Any) -> Any:
    """Train, test and save a recipe; see `dlkit.runner.run` (imported here lazily to keep `import dlkit` cheap)."""
    from dlkit.runner import run as run_recipe

    return run_recipe(*args, **kwargs)


def resume(*args: Any, **kwargs: Any) -> Any:
    """Continue an interrupted or killed run to the result it would have had; see `dlkit.runner.resume`."""
    from dlkit.runner import resume as resume_run

    return resume_run(*args, **kwargs)
