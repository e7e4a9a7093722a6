"""How gradcomp runs a model on data: one batch convention, one loss convention, one progress switch.

Every function of the package that runs a model on batches (activation capture and calibration,
sensitivity, gradient capture) follows the rules below, and each takes the same ``forward=`` /
``loss_fn=`` / ``progress=`` arguments to change them.

Batches. A batch is what the model is called with:

1. a dict is passed as keywords, ``model(**batch)`` (Hugging Face style);
2. a tuple or list is passed as positional arguments, ``model(*batch)`` (``(inputs, targets)`` for
   nanoGPT-style models that return a loss when given targets);
3. anything else is the one input, ``model(batch)``.

Outputs. The main tensor of an output (what activation and sensitivity metrics compare) is the
output itself if it is a tensor, the first element of a tuple or list (``(logits, loss)``), or its
``logits`` attribute or key.

Losses. :func:`default_loss` ``(model, batch) -> scalar tensor`` runs the model as above and takes the
loss from its output: the output itself if it is a scalar tensor, the second element of a
``(logits, loss)`` tuple, or the ``loss`` attribute or key. A model that computes no loss needs a
``loss_fn(model, batch)`` of the same signature, e.g.
``lambda m, b: F.cross_entropy(m(b[0]), b[1])``.

Progress. ``progress=True`` shows a tqdm bar on stderr; the default is no bar.

Example:
    >>> model = TinyGPT()                                # forward(idx, targets=None) -> (logits, loss)
    >>> batch = (x, y)
    >>> default_loss(model, batch)                        # model(x, y)[1]
    >>> output_tensor(call_model(model, batch))           # the logits
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.nn as nn

from gradcomp.checks import check_int

__all__ = [
    "Batch",
    "Forward",
    "call_model",
    "output_tensor",
    "output_tensors",
    "output_loss",
    "default_loss",
    "run_batches",
    "progress_bar",
]

Batch = Any
Forward = Callable[[nn.Module, Batch], Any]  # forward(model, batch) -> the model's output
T = TypeVar("T")


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one batch: ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``.

    Raises:
        TypeError: the call does not fit the model's signature (the message says how it was called).
    """
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except TypeError as exc:
        how = "model(**batch)" if isinstance(batch, dict) else "model(*batch)" if isinstance(batch, (tuple, list)) else "model(batch)"
        raise TypeError(
            f"calling the model as {how} failed ({exc}); pass loss_fn(model, batch) (or forward(model, batch) "
            "where an output is needed) that calls the model on this batch"
        ) from exc


def output_tensor(out: Any) -> torch.Tensor:
    """Return the main tensor of a model output: the tensor, the first of a tuple or list, or ``.logits``.

    Raises:
        TypeError: no tensor found.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model output must be a tensor, a tuple starting with one, or hold .logits, got {type(out).__name__}; "
        "pass forward(model, batch) that returns a tensor"
    )


def output_tensors(output: Any, *, detach: bool = True) -> Dict[str, torch.Tensor]:
    """Return the floating tensors of a model output by name, detached (unless ``detach=False``).

    The main tensor of the output (:func:`gradcomp.batches.output_tensor`: a tensor, the first of a
    tuple, ``logits``) when it has one, as ``{"output": t}``; otherwise every floating tensor of a
    dict, dataclass or named tuple, walked recursively (names joined by dots: ``{"energy": e,
    "forces": f}``); lists of tensors inside are concatenated per name (per-structure lists).

    Raises:
        TypeError: when the output holds no floating tensor.
    """
    cut = (lambda t: t.detach()) if detach else (lambda t: t)
    try:
        return {"output": cut(output_tensor(output))}
    except TypeError:
        pass
    found: Dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                found[name or "output"] = cut(obj)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{name}.{f.name}" if name else f.name)
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
            for k in obj._fields:
                walk(getattr(obj, k), f"{name}.{k}" if name else k)
        elif isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in obj):
            found[name or "output"] = torch.cat([cut(t).reshape(-1) for t in obj])

    walk(output, "")
    if not found:
        raise TypeError(
            f"the model output must hold at least one floating tensor (a tensor, or a dict/dataclass of them), "
            f"got {type(output).__name__}; pass forward(model, batch) that returns one"
        )
    return found


def output_loss(out: Any) -> Optional[torch.Tensor]:
    """Return the scalar loss a model output carries, or None.

    A scalar tensor output is the loss; so is the second element of a ``(logits, loss)`` tuple, or
    the ``loss`` attribute or key of the output.
    """
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else None
    if isinstance(out, (tuple, list)):
        if len(out) >= 2 and isinstance(out[1], torch.Tensor) and out[1].dim() == 0:
            return out[1]
        return None
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Return the loss of one batch: :func:`call_model`, then the loss the output carries (:func:`output_loss`).

    Raises:
        TypeError: the output carries no scalar loss (pass ``loss_fn(model, batch)``).
    """
    out = call_model(model, batch)
    loss = output_loss(out)
    if loss is None:
        raise TypeError(
            "cannot find a scalar loss in the model's output (expected a scalar tensor, a (logits, loss) tuple "
            f"or a .loss attribute), got {type(out).__name__}; pass loss_fn(model, batch)"
        )
    return loss


def progress_bar(iterable: Iterable[T], progress: bool, desc: str, *, total: Optional[int] = None, unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable``, with a tqdm bar on stderr when ``progress`` is True.

    The bar is closed when the iteration ends, also on an exception or an early ``break``.
    """
    if not progress:
        yield from iterable
        return
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
    try:
        yield from bar
    finally:
        bar.close()


def run_batches(model: nn.Module, batches: Iterable[Batch], *, forward: Optional[Forward] = None,
                num_batches: Optional[int] = None, progress: bool = False, desc: str = "batches") -> int:
    """Run forward passes in eval mode without gradients; return how many batches ran.

    Batches are called by :func:`call_model` unless ``forward(model, batch)`` is given. The training
    mode is restored afterwards, also after an exception.

    Args:
        model: the model.
        batches: any iterable of batches.
        forward: custom call.
        num_batches: stop after this many (None: the whole iterable).
        progress: show a tqdm progress bar on stderr.
        desc: progress bar label.
    """
    if num_batches is not None:
        check_int("num_batches", num_batches)
    call = forward or call_model
    total = num_batches
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    was_training = model.training
    model.eval()
    n = 0
    it = progress_bar(batches, progress, desc, total=total, unit="batch")
    try:
        with torch.no_grad():
            for batch in it:
                if num_batches is not None and n >= num_batches:
                    break
                call(model, batch)
                n += 1
    finally:
        it.close()
        model.train(was_training)
    return n
