"""Demo workloads for gradcomp's CLI, launch scripts, benchmarks and tests (not part of the library proper).

:mod:`gradcomp.examples.tasks` holds TinyGPT, a byte-level GPT, and its corpus (the Python standard
library's own source bytes). No library module imports this subpackage; the ``gradcomp`` command
imports it only for its built-in demo model, and ``tests/test_layout.py`` checks that.
"""
