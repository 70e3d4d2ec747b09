"""Each likelihood family owns everything specific to it: outside vaelab/models/likelihoods/ no code compares a
family's name (==, !=, in, match), and the explorer's static scripts do not spell one out either. What the rest
of vaelab needs to know about a family is an attribute or method of its likelihood object."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vaelab.models.likelihoods import LIKELIHOODS

SRC = Path(__file__).resolve().parents[1] / "src" / "vaelab"
OWNER = SRC / "models" / "likelihoods"
FAMILIES = frozenset(LIKELIHOODS)


def _strings(node: ast.AST) -> list[str]:
    """The string constants a compared operand spells: itself, or the items (keys) of a literal collection."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None]  # None: a **mapping
    else:
        items = [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def family_comparisons(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: name' for every comparison of a family name in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            spelled = [s for operand in (node.left, *node.comparators) for s in _strings(operand)]
        elif isinstance(node, ast.MatchValue):
            spelled = _strings(node.value)
        else:
            continue
        found += [f"{filename}:{node.lineno}: {s}" for s in spelled if s in FAMILIES]
    return found


def quoted_families(text: str, filename: str = "<script>") -> list[str]:
    names = "|".join(re.escape(n) for n in sorted(FAMILIES, key=len, reverse=True))
    pattern = re.compile(rf"""(["'`])({names})\1""")
    return [f"{filename}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(2)}" for m in pattern.finditer(text)]


def test_no_module_outside_the_likelihoods_compares_a_family_name():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if OWNER not in path.parents:
            found += family_comparisons(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))
    assert not found, "family names compared outside models/likelihoods/ (ask the likelihood object):\n" + "\n".join(
        found)


def test_the_static_scripts_name_no_family():
    found = []
    for path in sorted((SRC / "explorer" / "static").glob("*.js")):
        found += quoted_families(path.read_text(encoding="utf-8"), path.name)
    assert not found, "family names in the explorer's scripts (use the likelihood's page_* kinds):\n" + "\n".join(
        found)


@pytest.mark.parametrize(("source", "flagged"), [
    ('if lik == "laplace":\n    pass\n', ["laplace"]),
    ('ok = "gaussian" != name\n', ["gaussian"]),
    ('ok = name in ("gaussian", "other")\n', ["gaussian"]),
    ('ok = name not in {"bernoulli", "continuous-bernoulli"}\n', ["bernoulli", "continuous-bernoulli"]),
    ('ok = name in ["discretized-logistic"]\n', ["discretized-logistic"]),
    ('ok = name in {"discretized-gaussian": 1}\n', ["discretized-gaussian"]),
    ('match name:\n    case "laplace" | "other":\n        pass\n', ["laplace"]),
    ('name = "gaussian"\nf(likelihood="laplace")\nok = name == "gaussian-ish"\n', []),  # not comparisons
])
def test_the_scanner_flags_compared_family_names(source, flagged):
    assert [hit.rsplit(": ", 1)[1] for hit in family_comparisons(source)] == flagged


@pytest.mark.parametrize(("script", "flagged"), [
    ('if (lik === "laplace") x = 1;', ["laplace"]),
    ("const m = { 'bernoulli': f, `gaussian`: g };", ["bernoulli", "gaussian"]),
    ('const k = "cb-mean", t = "double-exponential"; // a gaussian in a comment', []),
])
def test_the_scanner_flags_quoted_family_names_in_scripts(script, flagged):
    assert [hit.rsplit(": ", 1)[1] for hit in quoted_families(script)] == flagged
