"""Records each test report as one JSON line in $MOEPATCH_PYTEST_REPORT.

Not imported by the tool: the runner copies this file into the run's temp dir
and pytest loads it with ``-p`` inside the vLLM tree (see runner.py).
"""

import json
import os

import pytest

_path = os.environ.get("MOEPATCH_PYTEST_REPORT")
_config = None


def _write(record):
    if not _path or (_config is not None and hasattr(_config, "workerinput")):
        return  # xdist workers: the controller records what they report
    with open(_path, "a") as f:
        f.write(json.dumps(record) + "\n")


# Lines of a tolerance failure (torch.testing.assert_close) that say by how
# much it failed; the first line alone only says that it did.
_DETAIL_PREFIXES = ("Mismatched elements", "Greatest absolute difference", "Greatest relative")


def _message(report):
    if report.passed:
        return ""
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    crash = getattr(getattr(lr, "reprcrash", None), "message", None)
    if crash:
        lines = [line.strip() for line in crash.strip().splitlines()]
        if not lines:
            return ""
        details = [line for line in lines[1:] if line.startswith(_DETAIL_PREFIXES)]
        return " | ".join([lines[0], *details])[:500]
    text = str(lr or "").strip().splitlines()
    return text[-1][:500] if text else ""


def pytest_configure(config):
    global _config
    _config = config


def _covered(nodeid, test):
    return nodeid == test or nodeid.startswith((test + "::", test + "["))


def pytest_collection_modifyitems(config, items):
    drop = json.loads(os.environ.get("MOEPATCH_PYTEST_DESELECT") or "[]")
    if not drop:
        return
    keep, gone = [], []
    for item in items:
        (gone if any(_covered(item.nodeid, t) for t in drop) else keep).append(item)
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep


def pytest_runtest_setup(item):
    # vLLM's CI runs each test directory as its own job; here several share a
    # worker. tests/kernels/moe turns per-test cleanup off and cleans on entry
    # only its own `dist_init` users, so a test there that leaves the
    # model-parallel groups up would fail the next `dist_init` test of another
    # directory. Give those the same clean entry.
    if "dist_init" in item.fixturenames and not item.nodeid.startswith("tests/kernels/moe/"):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):
        _write({"event": "collected", "count": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _write({"event": "collected", "count": len(ids), "worker": str(node.gateway.id)})


def pytest_collectreport(report):
    if report.failed:
        _write({"event": "collecterror", "nodeid": report.nodeid, "message": _message(report)})


def pytest_runtest_logreport(report):
    _write(
        {
            "event": "test",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "wasxfail": hasattr(report, "wasxfail"),
            "message": _message(report),
            "duration": round(report.duration, 3),
        }
    )
