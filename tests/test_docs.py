"""Every command in the README and docs/ is one a user can paste: each `recurchat …` line of a bash block parses with
recurchat's own argument parser (flags, choices and types exactly as written), each `python -m recurchat.X` names a
module that exists, and every relative link points at a file. The README stays a front door (≤ 120 lines).
Run: `pytest tests/test_docs.py`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from recurchat.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLACEHOLDERS = {r"\$\(python -m recurchat\.interop\.smollm2\)": "model.gguf", r"\$D\b": "datasets"}


def bash_lines(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in page.read_text().splitlines():
        if raw.startswith("```"):
            inside = raw.strip() == "```bash"
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def commands(page: Path) -> list[list[str]]:
    """argv after `recurchat` (or `-m recurchat`) for each recurchat command on the page, `&&` chains split."""
    out, variables = [], {}
    for line in bash_lines(page):
        for pattern, value in PLACEHOLDERS.items():
            line = re.sub(pattern, value, line)
        assigned = re.fullmatch(r"([A-Z_]+)=(\S.*)", line)
        if assigned:  # C="--preset cpu-tiny …": the page's shorthand for shared flags
            variables[assigned.group(1)] = " ".join(shlex.split(assigned.group(2)))
            continue
        for name, value in variables.items():
            line = re.sub(rf"\${name}\b", value, line)
        for part in line.split("&&"):
            if not re.search(r"(?:^|\s)recurchat\s", part):
                continue  # curl and JSON lines (which may open a quote closed lines later)
            words = shlex.split(part, comments=True)
            for start in range(len(words)):
                if words[start] == "recurchat" and (start == 0 or words[start - 1] == "-m" or "=" in words[start - 1]):
                    out.append(words[start + 1:])
                    break
    return out


def modules(page: Path) -> list[str]:
    return re.findall(r"python -m (recurchat(?:\.\w+)+)", page.read_text())


ALL = [(page.relative_to(ROOT).as_posix(), argv) for page in PAGES for argv in commands(page)]


def test_the_pages_hold_commands_to_check():
    assert len(ALL) > 80 and {argv[0] for _, argv in ALL} >= {"train", "eval", "serve", "sweep", "import", "bench"}


@pytest.mark.parametrize("page,argv", ALL, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in ALL])
def test_every_documented_command_parses(page, argv):
    if argv[0] == "lm-eval":  # lm_eval's own command line, passed through untouched
        return
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `recurchat {' '.join(argv)}` does not parse (exit {e.code})")


def test_every_documented_module_exists():
    missing = [(page.name, m) for page in PAGES for m in modules(page) if importlib.util.find_spec(m) is None]
    assert not missing


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text().splitlines()
    assert len(text) <= 120
    assert text[3].startswith("pip install") and text[5].startswith("python -m pytest")  # the contract lines
