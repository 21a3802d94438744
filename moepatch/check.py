"""Lint the series and prove it applies and round-trips, in a scratch tree."""

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import export
from .build import build
from .errors import SeriesError, ToolError
from .layout import BASE_TAG
from .pin import load_pin
from .series import header_problems, parse_patch, read_series_names, unlisted_patches


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)


def lint(patches_dir: Path) -> tuple[list, list[str]]:
    """Parse the series; return (patches, problems). Never touches a tree."""
    patches_dir = Path(patches_dir)
    names = read_series_names(patches_dir)
    problems, patches = [], []
    for extra in unlisted_patches(patches_dir, names):
        problems.append(f"patches/{extra}: not listed in patches/series")
    for name in names:
        try:
            patch = parse_patch(name, patches_dir / name)
        except SeriesError as e:
            problems.append(str(e))
            continue
        patches.append(patch)
        problems += [f"patches/{name}: {p}" for p in header_problems(patch)]
    return patches, problems


def check(pin_path: Path, patches_dir: Path, source: str = "auto") -> CheckReport:
    report = CheckReport()
    patches, report.problems = lint(patches_dir)
    if report.problems:
        return report
    pin_text = Path(pin_path).read_bytes()
    pin = load_pin(pin_path)
    scratch = Path(tempfile.mkdtemp(prefix="moepatch-check-"))
    try:
        tree = scratch / "vllm"
        try:
            result = build(pin, pin_text, patches, tree, source=source)
        except ToolError as e:
            report.problems.append(str(e))
            return report
        report.applied = [a["name"] for a in result.state.applied]
        for patch in patches:
            for test in patch.tests:
                if not (tree / test.split("::", 1)[0]).exists():
                    report.problems.append(
                        f"patches/{patch.name}: 'Tests: {test}' does not exist in the patched tree"
                    )
        rendered = export.render(tree, f"{BASE_TAG}..HEAD")
        for name in export.drift(patches_dir, rendered):
            report.problems.append(
                f"patches/{name}: differs from what apply + export produce "
                "(run `python apply.py && python apply.py export`)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report
