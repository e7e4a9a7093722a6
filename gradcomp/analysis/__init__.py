"""The analysis layer: what to quantize and what compression costs, measured before committing to it.

* :mod:`~gradcomp.analysis.sensitivity`: per-layer quantization sensitivity (one layer quantized at a
  time, the damage scored); its report types in :mod:`~gradcomp.analysis.sensitivity_report`;
* :mod:`~gradcomp.analysis.mixed_precision`: per-layer bit plans from rules or a budgeted allocation
  (:mod:`~gradcomp.analysis.bitplan` the plan, :mod:`~gradcomp.analysis.mckp` the knapsack solver,
  :mod:`~gradcomp.analysis.targets` deployment targets and recommendations);
* :mod:`~gradcomp.analysis.costmodel`: compare all-reduce schemes, break-even bandwidths, sweeps (the
  model itself is :mod:`gradcomp.comm.cost`, which the communication policy decides with);
* :mod:`~gradcomp.analysis.gradexp`: capture real gradients (:mod:`~gradcomp.analysis.capture`) and
  replay them offline through the hook's own exchange.

Data flows down: a model goes sensitivity -> plan -> :mod:`gradcomp.quant` -> :mod:`gradcomp.codec`.
This layer imports ``comm``, ``quant`` and ``codec``; none of them imports it. Import the names from
the four modules above (``from gradcomp.analysis.sensitivity import measure_sensitivity``); the most
used ones are also in :mod:`gradcomp`.
"""

__all__ = ["sensitivity", "mixed_precision", "costmodel", "gradexp"]
