"""The docs kept current: docs/architecture.md names every module of the four packages (and
nothing that is gone); docs/orchestration.md lists every deployment of prefect.yaml."""

from __future__ import annotations

import re

import yaml

from conftest import REPO

PACKAGES = ("engine", "cluster", "tasks", "flows")


def test_architecture_names_every_module_and_only_existing_ones():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set()
    for row in re.findall(r"^\| (`[^|]*)\|", text, flags=re.M):  # a table's first cell
        first, *others = re.findall(r"`([^`]+)`", row)
        folder = first.rsplit("/", 1)[0]
        named |= {first, *(f"{folder}/{name}" for name in others)}
    modules = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if p.name != "__init__.py" and "testcluster" not in p.parts}
    assert not modules - named, f"modules not in docs/architecture.md: {sorted(modules - named)}"
    gone = {n for n in named if not (REPO / n.rstrip("/")).exists()}
    assert not gone, f"docs/architecture.md names what does not exist: {sorted(gone)}"


def test_orchestration_docs_list_every_deployment():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    text = (REPO / "docs" / "orchestration.md").read_text()
    missing = [d["name"] for d in deployments if f"`{d['name']}`" not in text]
    assert not missing, f"deployments not in docs/orchestration.md: {missing}"
