"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = bash_blocks(readme)
    assert len(blocks) >= 2, "README needs the install-and-run and the test command blocks"
    test_command = blocks[1]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_main_command_config_exists():
    blocks = bash_blocks((REPO / "README.md").read_text())
    configs = re.findall(r"--config (\S+)", blocks[0])
    assert configs and all((REPO / c).is_file() for c in configs)
