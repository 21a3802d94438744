"""``python -m moepatch.testing``: ``apply.py test`` without apply.py, plus merge/compare."""

import sys

from .command import main

sys.exit(main())
