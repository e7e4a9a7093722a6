"""Demo workloads for gradcomp's CLI, launch scripts, benchmarks and tests (not part of the library).

:mod:`gradcomp_examples.tasks` holds TinyGPT, a byte-level GPT, and its corpus (the Python standard
library's own source bytes). The library (:mod:`gradcomp`) never imports this package; the
``gradcomp`` command imports it only for its built-in demo model.
"""
