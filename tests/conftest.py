import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def run_cli(*args: str, cwd=None, timeout: float = 600, input_text: str | None = None):
    """Run the installed ``dgprune`` console script (as a user would) and capture its output."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "dgprune"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, input=input_text
    )
