"""The README's install section: a user without a GPU is told how to get the CPU-only PyTorch."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cpu_only_torch_hint_comes_before_the_package_install():
    text = README.read_text()
    hint = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert hint in text
    block = text[text.index(hint):]
    assert block.index("pip install -e .") < block.index("```")  # the next command of the same block
    prose = text[: text.index(hint)].rsplit("```", 2)[-2]  # the paragraph before the code block
    assert "GPU" in prose and "CPU" in prose
