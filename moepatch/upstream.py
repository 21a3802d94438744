"""``apply.py upstream NAME``: turn one patch into an upstream vLLM pull request.

Steps, all in ``--out`` (default ``build/upstream/<name>``), never in the
built tree:

1. A repository with the pristine base (the pinned release, or ``--base
   VERSION|PATH``) and a branch ``upstream/<name>`` holding only that patch.
2. Does it apply alone? If not, the earlier patches of the series it needs
   are found (the smallest set, in series order, that lets it apply) and
   reported; nothing else is produced (exit 7).
3. Its tests on CPU: the patch's ``Tests:`` trailers plus the upstream tests
   mapped to it in ``patches/tests.toml``, run like ``apply.py test --device
   cpu`` (``VLLM_TARGET_DEVICE=cpu TRITON_INTERPRET=1``, tree on
   ``PYTHONPATH``). The GPU part runs through the device script.
4. The lint vLLM's pre-commit runs on Python: ``ruff check`` and ``ruff
   format --check`` on the touched ``.py`` files, with the tree's own ruff
   configuration (88 columns).
5. ``git format-patch`` of the branch commit, whose message has our
   project-only trailers (``Upstream:``, ``Status:``, ``Tests:``,
   ``Related:``, ``Patch-Filename:``) removed and ``Signed-off-by:`` (DCO)
   kept, and ``PR.md``: a description following the pinned tree's AGENTS.md
   rules for PRs (purpose, why it is not a duplicate with the related PRs,
   test commands with results, benchmark numbers from the patch body, the
   AI-assistance statement).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import gitutil, logger
from .errors import ConflictError, SeriesError, TargetError, ToolError
from .layout import BASE_TAG, build_dir
from .pin import load_pin
from .release import resolve_release
from .replay import CLEAN, THREE_WAY, UPSTREAMED, apply_mbox, write_mbox
from .series import Patch, read_series
from .source import add_source_argument, resolve_base
from .testing.runner import run_pytest
from .testing.selection import Selector, build_spec, select

PROJECT_TRAILERS = ("Upstream", "Status", "Tests", "Related", "Patch-Filename")
MARKER = "moepatch-upstream"
_BENCH = re.compile(
    r"(µs|\bus\b|\bms\b|GB/s|TFLOP|tok(en)?s/s|speed-?up|\d(\.\d+)?x\b|H100|H200|"
    r"A100|MI300|B200|benchmark)",
    re.IGNORECASE,
)


@dataclass
class UpstreamReport:
    name: str
    subject: str
    base: str
    base_version: str
    applies_alone: str | None = None  # clean / 3-way / conflict / upstreamed
    depends_on: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    tests: dict | None = None
    lint: list[dict] = field(default_factory=list)
    branch: str | None = None
    patch_file: str | None = None
    pr_file: str | None = None

    @property
    def ok(self) -> bool:
        tests_ok = self.tests is None or self.tests.get("verdict") in ("GREEN", "skipped")
        return (
            self.applies_alone in (CLEAN, THREE_WAY)
            and tests_ok
            and all(item["ok"] for item in self.lint)
        )


def _stem(name: str) -> str:
    return name.removesuffix(".patch")


def _find(patches: list[Patch], name: str) -> int:
    for i, p in enumerate(patches):
        if name in (p.name, _stem(p.name)):
            return i
    raise SeriesError(
        f"no patch {name!r} in the series (have: {', '.join(p.name for p in patches) or 'none'})"
    )


def _stack_applies(repo: Path, base: str, mboxes: list[Path]) -> tuple[bool, list[str]]:
    """Apply mboxes in order on base; (all applied, details of the failure)."""
    gitutil.run(repo, "checkout", "-q", "-f", "--detach", base)
    for mbox in mboxes:
        outcome = apply_mbox(repo, mbox)
        if outcome.status not in (CLEAN, THREE_WAY):
            return False, [f"{mbox.name}: {outcome.status}", *outcome.details]
    return True, []


def find_dependencies(
    repo: Path, base: str, patches: list[Patch], at: int, mboxes: dict[str, Path]
) -> tuple[list[str] | None, list[str]]:
    """The smallest ordered set of earlier patches that lets patches[at] apply.

    Tries the earlier patches that touch the same files first, then all of
    them; then drops each one that is not needed. None when even the whole
    prefix does not help.
    """
    target = patches[at]
    earlier = patches[:at]
    touched = set(target.touched_files())
    overlapping = [p for p in earlier if touched & set(p.touched_files())]
    last_details: list[str] = []
    for candidates in (overlapping, earlier):
        if not candidates:
            continue
        chain = [mboxes[p.name] for p in candidates] + [mboxes[target.name]]
        ok, last_details = _stack_applies(repo, base, chain)
        if not ok:
            continue
        needed = list(candidates)
        for p in reversed(candidates):
            trial = [q for q in needed if q is not p]
            chain = [mboxes[q.name] for q in trial] + [mboxes[target.name]]
            if _stack_applies(repo, base, chain)[0]:
                needed = trial
        return [p.name for p in needed], []
    return None, last_details


def clean_message(message: str) -> str:
    """The commit message without our project-only trailers (DCO sign-off kept)."""
    lines = message.rstrip("\n").split("\n")
    kept = [ln for ln in lines if not re.match(rf"^({'|'.join(PROJECT_TRAILERS)}): ", ln)]
    while kept and not kept[-1].strip():
        kept.pop()
    text = "\n".join(kept)
    # a trailer block left with only blank lines between paragraphs collapses
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def _ruff() -> list[str]:
    local = Path(sys.executable).parent / "ruff"
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    return [found] if found else [sys.executable, "-m", "ruff"]


def lint(tree: Path, files: list[str]) -> list[dict]:
    """ruff check and ruff format --check on files, with the tree's config."""
    py = [f for f in files if f.endswith(".py") and (tree / f).is_file()]
    if not py:
        return []
    results = []
    for args in (["check", "--no-fix"], ["format", "--check"]):
        cmd = [*_ruff(), *args, *py]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
        output = (proc.stdout + proc.stderr).strip()
        results.append(
            {
                "command": "ruff " + " ".join([*args, *py]),
                "ok": proc.returncode == 0,
                "output": output.splitlines()[-20:],
            }
        )
    return results


def run_tests(tree: Path, patches_dir: Path, patch: Patch, time_limit: float | None) -> dict:
    """The patch's CPU tests, run as ``apply.py test --patch NAME --device cpu`` runs them."""
    spec = build_spec(patches_dir, "cpu")
    groups = select(spec, [patch.name], False)
    exclude = [Selector(**s) for s in spec["exclude"]]
    result = run_pytest(
        tree, groups, exclude, device="cpu", quiet=True, time_limit=time_limit, label=patch.name
    )
    total = result["total"]
    return {
        "command": "cd <tree> && VLLM_TARGET_DEVICE=cpu TRITON_INTERPRET=1 "
        "PYTHONPATH=$PWD python -m pytest -q "
        + " ".join(c for c in result["command"][1:] if c.startswith("tests")),
        "verdict": result["verdict"],
        "counts": {k: total.get(k, 0) for k in ("passed", "failed", "error", "skipped", "xfailed")},
        "duration_s": result["duration_s"],
        "not_run": total.get("not_run", []),
    }


def agents_pr_rules(tree: Path) -> list[str]:
    """The bullet list under 'PR descriptions ... must include' in AGENTS.md."""
    try:
        text = (tree / "AGENTS.md").read_text(encoding="utf-8")
    except OSError:
        return []
    m = re.search(r"PR descriptions[^\n]*must\*?\*? include:\n((?:[ \t]+- [^\n]+\n)+)", text)
    return [ln.strip()[2:] for ln in m.group(1).splitlines()] if m else []


def pr_description(patch: Patch, report: UpstreamReport, rules: list[str]) -> str:
    body = clean_message(patch.body).strip()
    paragraphs = [p for p in body.split("\n\n") if p.strip()]
    related = patch.trailers.get("Related", [])
    bench = [p for p in paragraphs if _BENCH.search(p)]
    lines = [f"# {patch.subject}", "", "## Purpose", "", *(paragraphs[:2] or ["(see commit)"])]
    lines += ["", "## Why this is not a duplicate", ""]
    if related:
        lines.append(
            "Related upstream work, read before writing this change "
            "(the commit message explains how this differs):"
        )
        lines += [f"- {url}" for url in related]
    else:
        lines.append("No related upstream PR is known for this change.")
    upstream = patch.upstream
    if upstream.startswith("https://"):
        lines.append(f"\nEarlier submission of this change: {upstream}")
    lines += ["", "## Test plan", ""]
    if report.tests:
        t = report.tests
        counts = ", ".join(f"{v} {k}" for k, v in t.get("counts", {}).items() if v)
        lines += [
            "```",
            t["command"],
            "```",
            f"Result on CPU: {t['verdict']}" + (f" ({counts})" if counts else ""),
        ]
        for item in t.get("not_run", [])[:10]:
            lines.append(f"- not run on CPU: `{item['test']}` ({item['reason']})")
        lines.append("GPU tests: run with the project's device script on an H100/H200.")
    else:
        lines.append("Tests were not run for this description (--no-tests).")
    for item in report.lint:
        lines += ["```", item["command"], "```", f"Result: {'clean' if item['ok'] else 'FAILED'}"]
    lines += ["", "## Test results and benchmarks", ""]
    if bench:
        lines.append("From the change's own measurements (device and shapes as stated):")
        lines += ["", *[f"> {ln}" if ln else ">" for p in bench for ln in [*p.split("\n"), ""]]]
    else:
        lines.append("No benchmark numbers: the commit message records none.")
    lines += [
        "",
        "## AI assistance",
        "",
        "AI assistance was used to prepare this change and this description.",
        "",
        "- [ ] A human has reviewed every changed line and re-run the commands.",
    ]
    if rules:
        lines += ["", "## AGENTS.md checklist", ""]
        lines += [f"- [ ] {rule}" for rule in rules]
    return "\n".join(lines).rstrip() + "\n"


def prepare(
    name: str,
    pin_path: Path,
    patches_dir: Path,
    out: Path | None = None,
    base_spec: str | None = None,
    source: str = "auto",
    tests: bool = True,
    lint_files: bool = True,
    time_limit: float | None = 1800,
) -> UpstreamReport:
    pin = load_pin(pin_path)
    patches = read_series(patches_dir)
    at = _find(patches, name)
    patch = patches[at]
    out = Path(out or build_dir(patches_dir) / "upstream" / _stem(patch.name)).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TargetError(f"{out}: exists and was not written by apply.py upstream")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(patch.name + "\n")
    pinned_base = resolve_base(pin, source)
    if base_spec:
        kind = source if source in ("auto", "git", "sdist") else "sdist"
        base_pin, base = resolve_release(base_spec, pin, kind)
    else:
        base_pin, base = pin, pinned_base
    tree = out / "tree"
    tree.mkdir()
    gitutil.run(tree, "init", "-q")
    for b in {pinned_base.commit: pinned_base, base.commit: base}.values():
        gitutil.run(tree, "fetch", "-q", "--no-tags", str(b.repo), b.commit)
    gitutil.run(tree, "tag", "-f", BASE_TAG, base.commit)
    mboxes = {p.name: write_mbox(p, out / ".mbox") for p in patches}
    # The series on the pinned base first: its blobs let 3-way merges work on
    # another base, as in rebase.
    _stack_applies(tree, pinned_base.commit, list(mboxes.values()))
    report = UpstreamReport(patch.name, patch.subject, base.commit, base_pin.version)
    gitutil.run(tree, "checkout", "-q", "-f", "--detach", base.commit)
    outcome = apply_mbox(tree, mboxes[patch.name])
    report.applies_alone, report.details = outcome.status, outcome.details
    if outcome.status == UPSTREAMED:
        raise ToolError(
            f"{patch.name}: vLLM {base_pin.version} already has this change "
            "(upstreamed); nothing to send"
        )
    if outcome.status not in (CLEAN, THREE_WAY):
        deps, details = find_dependencies(tree, base.commit, patches, at, mboxes)
        report.depends_on = deps or []
        _write_report(out, report)
        if deps:
            raise ConflictError(
                f"{patch.name} does not apply alone on vLLM {base_pin.version}; "
                f"it needs: {', '.join(deps)}",
                "send those upstream first (apply.py upstream NAME for each), or "
                "submit them together",
                deps,
            )
        raise ConflictError(
            f"{patch.name} does not apply on vLLM {base_pin.version}, even after the "
            f"earlier patches: {'; '.join(outcome.details + details)}",
            f"rebase the series onto it first (apply.py rebase --to {base_pin.version})",
        )
    branch = f"upstream/{_stem(patch.name)}"
    message = gitutil.out(tree, "log", "-1", "--format=%B", strip=False)
    author_date = gitutil.out(tree, "log", "-1", "--format=%aI")
    env = {**gitutil.env_for(gitutil.COMMITTER), "GIT_COMMITTER_DATE": author_date}
    gitutil.run(tree, "commit", "-q", "--amend", "-m", clean_message(message), env=env)
    gitutil.run(tree, "checkout", "-q", "-B", branch)
    report.branch = branch
    if tests:
        report.tests = run_tests(tree, patches_dir, patch, time_limit)
    if lint_files:
        report.lint = lint(tree, patch.touched_files())
    written = gitutil.out(
        tree,
        "format-patch",
        "--full-index",
        "--no-signature",
        "--keep-subject",
        "-o",
        str(out.resolve()),
        "-1",
        branch,
    )
    report.patch_file = written.strip().splitlines()[-1]
    pr = out / "PR.md"
    pr.write_text(pr_description(patch, report, agents_pr_rules(tree)), encoding="utf-8")
    report.pr_file = str(pr)
    _write_report(out, report)
    return report


def _write_report(out: Path, report: UpstreamReport) -> None:
    data = {**report.__dict__, "ok": report.ok}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

UPSTREAM_DOC = "Prepare one patch as an upstream vLLM pull request.\n\n" + __doc__.split("\n\n", 1)[
    1
].replace("``", "`")


def configure_upstream(parser) -> None:
    parser.add_argument("name", metavar="NAME", help="the patch (file name, .patch optional)")
    parser.add_argument(
        "--base",
        metavar="VERSION|PATH",
        help="a newer base than the pin: a version on the index or a local sdist / tree",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: build/upstream/NAME beside patches/)",
    )
    add_source_argument(parser, help="where the pinned release comes from (default: auto)")
    parser.add_argument("--no-tests", action="store_true", help="skip the CPU tests")
    parser.add_argument("--no-lint", action="store_true", help="skip ruff")
    parser.add_argument("--json", action="store_true", help="print report.json")


def run_upstream(args) -> int:
    report = prepare(
        args.name,
        args.pin,
        args.patches,
        args.out,
        args.base,
        args.source,
        not args.no_tests,
        not args.no_lint,
    )
    if args.json:
        print(json.dumps({**report.__dict__, "ok": report.ok}, indent=2))
        return 0 if report.ok else 1
    print(
        f"{report.name}: applies alone on vLLM {report.base_version} "
        f"({report.applies_alone}); branch '{report.branch}'"
    )
    if report.tests:
        t = report.tests
        print(f"tests (CPU): {t['verdict']}  {t.get('counts', {})}")
    for item in report.lint:
        print(f"lint: {item['command']}: {'clean' if item['ok'] else 'FAILED'}")
        if not item["ok"]:
            print("  " + "\n  ".join(item["output"]))
    print(f"wrote {report.patch_file}")
    print(f"wrote {report.pr_file}")
    logger.info("report: %s", Path(report.pr_file).parent / "report.json")
    return 0 if report.ok else 1
