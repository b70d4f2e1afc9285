"""The README's two commands are what CI runs (a newcomer copies exactly these)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_starts_with_install_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "pip install" in cmds[0] and "yolocell detect --sample" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in _readme_commands():
        assert cmd in [line.strip() for line in ci], f"CI does not run: {cmd}"
