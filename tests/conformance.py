"""Where libvirt's own XML test data is, for the tests that hold vcfs to it.

The data is libvirt's (GPL test files) and is never copied into this repository: the tests read
it from a libvirt source tree's `tests/` folder, named by $VCFS_LIBVIRT_TESTS, by default
`../shared/conformance/libvirt/tests` beside the checkout. Where it is absent, the tests that
need it (they take the `libvirt_data` fixture) are skipped with that reason; with
$VCFS_REQUIRE_CONFORMANCE=1, which `.ci/run` sets, they fail instead, so that CI cannot pass by
skipping them.

Threading rule: plain functions, called at collection and from fixtures (pytest's thread).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VCFS_LIBVIRT_TESTS"
REQUIRE_ENV = "VCFS_REQUIRE_CONFORMANCE"
DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/conformance/libvirt/tests"
SUBDIRS = (
    "qemudomaincheckpointxml2xmlin",
    "qemudomaincheckpointxml2xmlout",
    "domainbackupxml2xmlin",
    "domainbackupxml2xmlout",
)
"""The folders of libvirt's tests/ the tests read."""
ABSENT = "no-libvirt-data"
"""The one case a data-driven parametrization gets when the data is absent: the test is then
collected and skipped with the reason, instead of vanishing as an empty parameter set."""


def tests_dir() -> Path:
    """The libvirt `tests/` folder: $VCFS_LIBVIRT_TESTS, or the default beside the checkout."""
    named = os.environ.get(ENV)
    return Path(named).absolute() if named else DEFAULT


def missing_reason() -> str | None:
    """Why the data cannot be used, or None when every folder the tests read is there."""
    root = tests_dir()
    missing = [d for d in SUBDIRS if not (root / d).is_dir()]
    if not missing:
        return None
    what = f"no {', '.join(missing)} in {root}" if root.is_dir() else f"{root} does not exist"
    return (
        f"libvirt conformance data not found: {what} "
        f"(set {ENV} to a libvirt source tree's tests/ folder)"
    )


def required() -> bool:
    """Whether a missing data set is an error here (CI) rather than a reason to skip."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def cases(folder: Path, pattern: str, paired_with: Path | None = None) -> list[str]:
    """Sorted stems of `folder`'s files matching `pattern` (with the same name in `paired_with`
    when given); [ABSENT] when the data set is missing."""
    if missing_reason() is not None:
        return [ABSENT]
    return sorted(
        p.stem
        for p in folder.glob(pattern)
        if paired_with is None or (paired_with / p.name).exists()
    )
