"""The worker processes of ``ci/bench_layers.py``: one per vLLM tree, driven over a pipe.

Two vLLM trees cannot share one interpreter. ``WorkerProc`` (in the parent)
starts ``bench_layers.py worker`` with the tree first on ``PYTHONPATH``;
``worker_main`` (in the child) runs each JSON command it reads as a method of
``Worker`` and answers with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

from layer_profile import ProfiledBlocks

#: the script whose ``worker`` subcommand runs ``worker_main``
BENCH_LAYERS = Path(__file__).resolve().with_name("bench_layers.py")


class Worker(ProfiledBlocks):
    """Builds and times the blocks of one vLLM tree; commands come over a pipe."""


def worker_main(args: argparse.Namespace) -> int:
    cmd_in = os.fdopen(args.cmd_fd, "r")
    res_out = os.fdopen(args.res_fd, "w")

    def reply(obj: dict) -> None:
        res_out.write(json.dumps(obj) + "\n")
        res_out.flush()

    try:
        w = Worker(args.label, Path(args.outdir))
        info = w.init_vllm()
        reply({"ok": True, "result": info})
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        return 1
    for line in cmd_in:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            reply({"ok": True, "result": None})
            break
        try:
            result = getattr(w, op)(**msg)
            reply({"ok": True, "result": result})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


class WorkerProc:
    """A worker subprocess with its tree first on PYTHONPATH."""

    def __init__(self, label: str, tree: Path, site: Path | None, work: Path):
        self.label = label
        self.log_path = work / f"worker-{label}.log"
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        path = [str(tree)] + ([str(site)] if site else [])
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # Device rule: NVLink multicast stays off in every process.
        env.update(
            NCCL_NVLS_ENABLE="0",
            TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
            NVSHMEM_DISABLE_NVLS="1",
        )
        outdir = work / "outputs" / label
        outdir.mkdir(parents=True, exist_ok=True)
        self.outdir = outdir
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH_LAYERS),
                "worker",
                "--label",
                label,
                "--outdir",
                str(outdir),
                "--cmd-fd",
                str(cmd_r),
                "--res-fd",
                str(res_w),
            ],
            env=env,
            cwd=str(work),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(cmd_r, res_w),
        )
        os.close(cmd_r)
        os.close(res_w)
        self.cmd = os.fdopen(cmd_w, "w")
        self.res = os.fdopen(res_r, "r")

    def send(self, op: str, **kw) -> None:
        self.cmd.write(json.dumps({"op": op, **kw}) + "\n")
        self.cmd.flush()

    def recv(self):
        line = self.res.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died; log tail:\n{self.tail()}")
        msg = json.loads(line)
        if not msg["ok"]:
            raise RuntimeError(f"worker {self.label}: {msg['error']}")
        return msg["result"]

    def call(self, op: str, **kw):
        self.send(op, **kw)
        return self.recv()

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()
