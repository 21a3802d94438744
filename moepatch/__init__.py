"""vllm-moe-patches: build, test, rebase and upstream a patch series on vLLM."""

import logging

logger = logging.getLogger("moepatch")
