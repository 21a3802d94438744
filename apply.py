#!/usr/bin/env python3
"""Build a verified, patched vLLM tree from vllm.pin and patches/series.

Run `python apply.py --help` for the commands.
"""

import sys

from moepatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
