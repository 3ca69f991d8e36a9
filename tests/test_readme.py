"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]  # the first: score, prune, compress
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Accuracy(intra=" in printed and "ModelCost(params=" in printed


def test_readme_torch_pruning_example_is_the_tested_one():
    """The README's Torch-Pruning block is docs/torch_pruning.md's, which test_tp_integration runs."""
    root = Path(__file__).parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    [readme_block] = [block for block in blocks if "DomainImportance" in block]
    docs = (root / "docs/torch_pruning.md").read_text()
    docs_block = re.findall(r"```python\n(.*?)```", docs, flags=re.S)[0]
    assert readme_block == docs_block
    assert len(readme_block.strip().splitlines()) <= 20
