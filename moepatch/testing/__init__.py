"""``apply.py test``: vLLM's upstream tests and each patch's own, on a built tree.

One module per job: ``selection`` (what to run: Tests: trailers and
patches/tests.toml), ``pytest_plugin`` (what the pytest subprocess records),
``runner`` (running pytest in the tree, the time limit), ``summary`` (per-patch
rows, verdict codes, the table), ``merge`` (combining split runs; base vs
patched), ``command`` (the command line; ``python -m moepatch.testing``).
"""
