"""Set-up hygiene: installing from a fresh clone leaves the tree as it was committed."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_lock_lists_every_platforms_optional_packages() -> None:
    # npm adds any optional (per-platform) package missing from the lock, which dirtied a
    # fresh clone on its first `make setup`; a complete lock is what `npm ci` needs.
    lock = json.loads((ROOT / "package-lock.json").read_text())
    packages = lock["packages"]
    missing = [
        f"{name} (optional dependency of {path})"
        for path, entry in packages.items()
        for name in entry.get("optionalDependencies", {})
        if f"node_modules/{name}" not in packages
    ]
    assert not missing, "package-lock.json lacks: " + ", ".join(missing)


def test_npm_packages_install_with_npm_ci() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipes = [line.strip() for line in makefile.splitlines() if re.match(r"\tnpm ", line)]
    assert recipes, "the Makefile installs no npm packages"
    assert all(r.startswith("npm ci ") for r in recipes), recipes
