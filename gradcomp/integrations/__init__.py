"""Use the hook where people already train: PyTorch Lightning, HF accelerate and the HF Trainer.

Each framework is an optional extra and each module imports its framework only when imported
itself, so ``import gradcomp`` never pulls one in:

* :mod:`gradcomp.integrations.lightning`: ``GradcompCallback(bits=8)`` (``pip install gradcomp[lightning]``);
* :mod:`gradcomp.integrations.accelerate`: ``register(accelerator, model, bits=8)`` (``pip install gradcomp[accelerate]``);
* :mod:`gradcomp.integrations.hf`: ``register(trainer, bits=8)`` for ``transformers.Trainer`` (``pip install gradcomp[hf]``).

All three log the hook's statistics through the framework (:func:`metrics`) and keep every rank's
hook state in the framework's own checkpoint (:mod:`gradcomp.comm.checkpoint`), so a resume is
bit-exact although the framework writes the file from rank 0 only.
"""

from __future__ import annotations

from gradcomp.integrations._common import metrics

__all__ = ["metrics"]
