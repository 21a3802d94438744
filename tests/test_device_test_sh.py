"""ci/device_test.sh refuses bad options before it touches a bundle or a GPU."""

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "device_test.sh"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--runs", "base,patched", "--gpus", "0"], "--gpus 0 names fewer GPUs than --runs"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_bad_options_stop_with_exit_2_and_say_why(tmp_path, args, message):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--bundle", str(tmp_path / "none"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")},
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before making its output folder
