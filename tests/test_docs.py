"""The documentation a user reads: its commands parse, its links resolve, and the README stays a user's guide."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import vaelab
from vaelab.cli import build_parser
from vaelab.config import TrainConfig
from vaelab.flags import given_settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# words about how vaelab was built rather than what it does
PROCESS = re.compile(r"\bthis stop\b|\bstop \d|\bissues? ?#?\d|\bthis issue\b|\bthis change\b|\bwe tried\b"
                     r"|\bearlier runs?\b", re.IGNORECASE)


def _code_lines(page: Path, lang: str = "bash") -> list[str]:
    """The lines of the page's ```bash blocks."""
    lines, inside = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside and line[3:].strip() == lang
        elif inside:
            lines.append(line)
    return lines


def _vaelab_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in _code_lines(page):
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"] and "vaelab" in words:  # torchrun [its options] -m vaelab ...
                words = words[words.index("vaelab"):]
            if words[:1] == ["vaelab"]:
                found.append((f"{page.name}: {line.strip()}", words[1:]))
    return found


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; keep it a user's guide (details belong in docs/)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_process_words(page):
    hits = [f"{page.name}:{i}: {line.strip()}" for i, line in enumerate(page.read_text().splitlines(), 1)
            if PROCESS.search(line)]
    assert not hits, "pages speak of the product, not of how it was built:\n" + "\n".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    broken = [t for t in targets if "://" not in t and not t.startswith("#")
              and not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_documented_commands_parse():
    """Every `vaelab ...` line in a bash block parses with the real parser; train lines also make a valid config."""
    commands = _vaelab_commands()
    assert any(words[:1] == ["train"] for _, words in commands)
    parser = build_parser()
    for where, words in commands:
        try:
            args = parser.parse_args(words)
        except SystemExit as e:
            exited: SystemExit | None = e
        else:
            exited = None
        if exited is not None:  # only a --help line may exit, and cleanly
            assert exited.code == 0, f"does not parse: {where}"
            assert "--help" in words, f"does not parse: {where}"
            continue
        if args.command == "train" and not args.resume:
            TrainConfig(**given_settings(args))


def test_documented_api_exists():
    """The functions the README's Python example calls are the package's top-level API."""
    code = "\n".join(_code_lines(ROOT / "README.md", "python"))
    names = set(re.findall(r"\bvaelab\.(\w+)", code))
    assert {"train", "load_run", "evaluate", "resume", "report", "plot"} <= names
    missing = [n for n in names if not hasattr(vaelab, n)]
    assert not missing, f"README's Python example uses vaelab.{missing}, which vaelab does not export"
