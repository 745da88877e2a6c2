"""Fail unless pyproject's lower bounds are exactly .ci/min-versions.txt's pins, and those are what is installed.

Run in the venv that .ci/run built with ``pip install -c .ci/min-versions.txt -e ".[hf,test]"``, so a bound
raised or lowered in one file and not the other, or a pin pip did not honour, fails CI instead of going untested.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TESTED_EXTRAS = ("hf", "s3", "gcs", "azure", "plot", "test")  # gcs, azure: against emulators


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            out[canonicalize_name(name)] = Version(pinned)
    return out


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in TESTED_EXTRAS for r in project["optional-dependencies"][extra]]
    pinned, problems = pins(), []
    for req in requirements:
        name = canonicalize_name(req.name)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if name not in pinned:
            problems.append(f"{req}: not pinned in .ci/min-versions.txt")
        elif lower != [pinned[name]]:
            problems.append(f"{req}: lower bound is not the pinned minimum {pinned[name]}")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req}: excludes its own minimum {pinned[name]}")
    for name, want in pinned.items():
        try:
            have = Version(version(name))
        except PackageNotFoundError:
            problems.append(f"{name}: pinned but not installed")
            continue
        if Version(have.base_version) != want:  # torch reports 2.13.0+cpu
            problems.append(f"{name}: installed {have}, pinned {want}")
    for problem in problems:
        print(f"min-versions: {problem}", file=sys.stderr)
    if not problems:
        print(f"min-versions: {len(pinned)} pins installed, equal to pyproject's lower bounds")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
