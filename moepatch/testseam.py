"""Named points in long operations where the tool's own tests interrupt it.

Off unless the tests set one of these in a child process's environment:

- MOEPATCH_TEST_KILL_AT=NAME: the process SIGKILLs itself on reaching NAME, as
  a user's kill -9 or a lost CI runner would stop it there.
- MOEPATCH_TEST_BARRIER=NAME:DIR:N: at NAME, wait until N processes have
  arrived in DIR, so concurrent runs meet at the same step on purpose.
"""

import os
import signal
import time
from pathlib import Path

KILL_ENV = "MOEPATCH_TEST_KILL_AT"
BARRIER_ENV = "MOEPATCH_TEST_BARRIER"
_BARRIER_TIMEOUT_S = 120


def point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    barrier = os.environ.get(BARRIER_ENV, "")
    if barrier.startswith(f"{name}:"):
        _, where, count = barrier.split(":")
        _meet(Path(where), int(count))


def _meet(where: Path, count: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / str(os.getpid())).touch()
    deadline = time.monotonic() + _BARRIER_TIMEOUT_S
    while len(list(where.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.01)
