"""What ``apply.py test`` runs: each patch's ``Tests:`` trailers plus ``patches/tests.toml``.

A selector is a file, directory or node id of the tree; a group is the
selectors of one patch (or ``--all-moe``, or ``--test``). ``build_spec``
resolves the selection into JSON (shippable to a machine without the series),
``select`` picks the groups to run, ``plan`` turns them into pytest targets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TestSetupError

TESTS_TOML = "tests.toml"
ALL_MOE = "all-moe"


@dataclass
class Selector:
    test: str  # path of a file/dir in the tree, or a node id (path::name...)
    reason: str

    @property
    def path(self) -> str:
        return self.test.split("::", 1)[0]

    def covers(self, nodeid: str) -> bool:
        t = self.test.rstrip("/")
        if nodeid == t or nodeid.startswith((t + "::", t + "[")):
            return True
        return "::" not in t and nodeid.startswith(t + "/")


@dataclass
class Group:
    name: str  # patch file name, or "all-moe"
    subject: str = ""
    selectors: list[Selector] = field(default_factory=list)


def _load_toml(path: Path) -> dict:
    import tomllib

    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TestSetupError(f"{path}: {e}") from None


def _selectors(items: list, where: str) -> list[Selector]:
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"test": item, "reason": ""}
        if not isinstance(item, dict) or not item.get("test"):
            raise TestSetupError(f"{where}: each entry needs 'test' (and 'reason')")
        out.append(Selector(str(item["test"]), str(item.get("reason", ""))))
    return out


def build_spec(patches_dir: Path, device: str = "cpu") -> dict:
    """Resolve the selection for ``device`` from patches/ (series + tests.toml).

    The result is JSON-able, so it can be shipped to a machine that has
    neither the series nor git (the GPU device bundle).
    """
    from ..series import read_series

    patches_dir = Path(patches_dir)
    cfg = _load_toml(patches_dir / TESTS_TOML)
    extra = cfg.get("patch", {})
    groups = []
    series = read_series(patches_dir) if (patches_dir / "series").is_file() else []
    for p in series:
        sels = [
            Selector(t.strip(), f"Tests: trailer of {p.name}") for t in p.trailers.get("Tests", [])
        ]
        sels += _selectors(
            extra.get(p.name, {}).get("tests", []), f"{TESTS_TOML} [patch.{p.name!r}]"
        )
        groups.append(
            {
                "name": p.name,
                "subject": p.subject,
                "selectors": [s.__dict__ for s in sels],
            }
        )
    unknown = set(extra) - {p.name for p in series}
    if unknown:  # e.g. a patch not yet listed in series: say so, do not fail
        print(
            f"warning: {TESTS_TOML} names patches not in the series: {sorted(unknown)}",
            file=sys.stderr,
        )
    all_moe = _selectors(cfg.get(ALL_MOE, {}).get("tests", []), f"{TESTS_TOML} [{ALL_MOE}]")
    by_device = {
        dev: [
            s.__dict__
            for s in _selectors(
                cfg.get("device", {}).get(dev, {}).get("exclude", []),
                f"{TESTS_TOML} [device.{dev}]",
            )
        ]
        for dev in ("cpu", "cuda")
    }
    return {
        "device": device,
        "groups": groups,
        ALL_MOE: [s.__dict__ for s in all_moe],
        "exclude": by_device[device],
        "exclude_by_device": by_device,
    }


def select(
    spec: dict, patches: list[str] | None, all_moe: bool, tests: list[str] | None = None
) -> list[Group]:
    """The groups to run: the named patches (default all), plus all-moe if asked."""
    groups = {
        g["name"]: Group(g["name"], g.get("subject", ""), [Selector(**s) for s in g["selectors"]])
        for g in spec["groups"]
    }
    chosen: list[Group] = []
    if patches:
        for name in patches:
            match = groups.get(name) or groups.get(name + ".patch")
            if match is None:
                raise TestSetupError(
                    f"no patch {name!r} in the series (have: {', '.join(groups) or 'none'})"
                )
            if match not in chosen:
                chosen.append(match)
    elif not tests:
        chosen = list(groups.values())
    if tests:
        chosen.append(
            Group(
                "ad-hoc",
                "tests named with --test",
                [Selector(t, "named with --test") for t in tests],
            )
        )
    if all_moe:
        chosen.append(
            Group(
                ALL_MOE,
                "all upstream MoE kernel tests",
                [Selector(**s) for s in spec.get(ALL_MOE, [])],
            )
        )
    return chosen


def plan(tree: Path, groups: list[Group], exclude: list[Selector]):
    """Turn groups into pytest targets.

    Returns:
        (targets, absent, excluded): the minimal list of selectors to pass to
        pytest; selectors whose file is not in this tree; and the exclusions
        that touch the selection, as (selector, reason).
    """
    wanted: list[Selector] = []
    absent: list[Selector] = []
    for g in groups:
        for s in g.selectors:
            if not (tree / s.path).exists():
                if s.test not in [a.test for a in absent]:
                    absent.append(s)
            elif s.test not in [w.test for w in wanted]:
                wanted.append(s)
    # drop selectors covered by a wider one (pytest would collect them twice)
    targets = [
        s
        for s in wanted
        if not any(o is not s and o.covers(s.test) and o.test != s.test for o in wanted)
    ]
    excluded = [e for e in exclude if any(t.covers(e.test) or e.covers(t.test) for t in targets)]
    # a target wholly inside an exclusion is not run at all
    targets = [
        t for t in targets if not any(e.covers(t.test) or e.test == t.test for e in excluded)
    ]
    return targets, absent, excluded
