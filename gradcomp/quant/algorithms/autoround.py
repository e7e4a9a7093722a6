"""AutoRound: learn each weight's rounding and each group's range against the whole model's output.

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs"
(AutoRound, 2023), after Nagel et al.'s AdaRound (2020). GPTQ and awq_clip look at one layer at a
time and score its own output error on its own (unquantized) inputs; errors of different layers then
add up or cancel by chance. AutoRound keeps the format of round-to-nearest (one scale per group,
integral codes) and learns, for every weight, whether it rounds up or down, and, for every group,
how far its range is clipped, by gradient descent on the deviation of the quantized **model's
outputs** from the fp32 model's outputs on calibration data.

Parameters (per quantized weight, in its layout of ``rows * groups`` blocks of ``block`` values):
    * ``v`` (one per weight) in ``[-0.5, 0.5]``: the code is ``round(w / s + v)``, so each weight
      moves at most one grid step from round-to-nearest (which is ``v = 0``).
    * ``r`` (one per group) in ``[min_ratio, 1]``: the group's range ``[r min, r max]``, as the
      clipping search of awq_clip uses it; the scale is that of round-to-nearest on that range.

Steps:
    1. Run the fp32 model on every calibration batch through ``forward(model, batch)`` and keep its
       outputs (a tensor, or a dict / tuple of tensors: one per head).
    2. Start from ``v = 0`` and awq_clip's ranges (``init="awq_clip"``: ``r`` from the clipping
       search on the input Hessians), or round-to-nearest (``init="rtn"``: ``r = 1``).
    3. For ``steps`` steps, one training batch each (in turn): put the fake-quantized weights
       ``s(r) * clamp(round(w / s(r) + v))`` into the model (straight-through estimator for the
       rounding; the scale rounded to its storage dtype the same way), run ``forward``, and take the
       loss ``sum_k a_k ||y_k - y_k^fp32||^2 / N_k / sum_k a_k`` over the outputs ``k`` (``a_k``: the
       ``weights`` option, 1 by default: the mean). ``N_k`` is the error of
       output ``k`` at the starting point (``normalize="initial"``: every output starts at 1, so an
       output with a large constant offset, like an energy, is not drowned by the others) or its
       fp32 power ``||y_k^fp32||^2`` (``normalize="power"``, the ``rel_mse`` of the sensitivity
       module). Step ``v`` (and ``r`` with ``ranges=True``) by the sign of the gradient
       (``optimizer="sign"``, AutoRound's signed gradient descent) or by Adam, with a learning rate
       that decays linearly to 0, and clip them to their bounds.
    4. Every ``eval_every`` steps (and at 0 and the end) score the selection batches (the last
       ``holdout`` calibration batches, which are never trained on; all training batches when
       ``holdout=0``) and keep the parameters of the best score. The starting point is scored too, so
       the result is never worse than it on the selection batches.
    5. Make the codes ``round(w / s + v)`` with the stored scale ``s`` and pack them with
       :meth:`gradcomp.quant.modules.PackedWeight.from_codes`: the very modules and files that
       round-to-nearest produces, and the very values the selection scored.

Worked example (int4 symmetric, one group, ``s = 0.1``): ``w = 0.26`` rounds to code 3 (0.30); with
``v = -0.2`` the code is ``round(2.6 - 0.2) = 2`` (0.20). No ``v`` in ``[-0.5, 0.5]`` can give code 4
or 1: the result stays within one step of round-to-nearest, which bounds how far it can overfit the
calibration data.

Calibration data: each training batch should be used about once or twice (``steps`` up to twice the
number of training batches; :attr:`AutoRoundResult.passes`, a warning above 2). With the labels
being the fp32 model's own outputs, more batches cost only their forward passes; on CHGNet going from
35 to 441 training batches for the same 400 steps took the energy error from 80.5 to 55.3 meV/atom,
where more steps over the 35 batches made it worse.

Cost: ``steps`` forward and backward passes over one batch each; forward passes over every batch
for the fp32 outputs, over the training batches for ``normalize="initial"`` and for the Hessians of
``init="awq_clip"``, and over the selection batches about ``steps / eval_every + 1`` times. Outputs
that are gradients (forces from ``autograd.grad(..., create_graph=True)``) are trained through (a
double backward). On CHGNet (412k weights, 6 structures a batch, all four outputs) 100 steps take
about a minute on one CPU thread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from gradcomp.batches import call_model, progress_bar
from gradcomp.codec import choose_qparams, qrange
from gradcomp.quant.configs import WeightQuantConfig
from gradcomp.quant.layout import _layout, _store_scale

logger = logging.getLogger(__name__)

__all__ = ["AutoRound", "AutoRoundResult", "autoround_quantize"]

OPTIMIZERS = ("sign", "adam")
INITS = ("rtn", "awq_clip")
NORMALIZE = ("power", "initial")


@dataclass(frozen=True)
class AutoRound:
    """Options of :func:`autoround_quantize` (``method=AutoRound(...)`` or ``method="autoround"`` of ``quantize_``).

    Attributes:
        steps: optimisation steps, one calibration batch each (0: the starting point, packed).
        lr: learning rate at step 0, decayed linearly to 0; None: ``0.5 / steps`` for ``"sign"`` (the
            offsets can move a quarter of their range; AutoRound's ``1 / steps``, tried with the
            ranges learnt too, fitted the calibration structures of the CHGNet example at the cost of
            the test set) and ``0.005`` for ``"adam"``.
        optimizer: ``"sign"`` (signed gradient descent) or ``"adam"``.
        min_ratio: the strongest clipping of a group's range, in (0, 1].
        init: ``"awq_clip"`` (ranges from the clipping search on the input Hessians of the Linear
            layers; one more calibration pass; other layers start from round-to-nearest) or ``"rtn"``.
        holdout: calibration batches (the last ones) kept out of training and used to pick the best
            step; 0 picks it on the training batches.
        eval_every: steps between selection passes; None: ``max(1, steps // 10)``.
        normalize: ``"initial"`` (each output's squared error over its error at the starting point)
            or ``"power"`` (over its fp32 power, the sensitivity module's ``rel_mse``; an output with a
            large constant offset, like CHGNet's energy, then weighs almost nothing).
        ranges: learn the group ranges ``r`` too (default False: only the rounding offsets move and
            the ranges stay those of the starting point; on CHGNet learning them made training
            unstable and the result worse on every output).
        weights: ``{output name: weight >= 0}``: each output's normalised error is multiplied by its
            weight in the loss and the selection score (outputs not named weigh 1; the sum is divided
            by the total weight). Use it to favour the output the task is judged on (CHGNet's energy).
            Given as a dict, stored as sorted ``(name, weight)`` pairs.

    The method is deterministic: training batches are taken in turn, no random draw is made.
    """

    steps: int = 100
    lr: Optional[float] = None
    optimizer: str = "sign"
    min_ratio: float = 0.5
    init: str = "awq_clip"
    holdout: int = 0
    eval_every: Optional[int] = None
    normalize: str = "initial"
    ranges: bool = False
    weights: Optional[Any] = None

    name = "autoround"
    needs_data = True
    whole_model = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise ValueError(f"lr must be None or a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.min_ratio, bool) or not isinstance(self.min_ratio, (int, float)) or not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise ValueError(f"holdout must be a non-negative int (calibration batches), got {self.holdout!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 1):
            raise ValueError(f"eval_every must be None or a positive int, got {self.eval_every!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not isinstance(self.ranges, bool):
            raise TypeError(f"ranges must be a bool, got {type(self.ranges).__name__}")
        if self.weights is not None:
            items = list(self.weights.items()) if isinstance(self.weights, Mapping) else None
            if items is None:
                try:
                    items = [tuple(p) for p in self.weights]
                except TypeError:
                    items = None
            if items is None or not all(len(p) == 2 for p in items):
                raise TypeError(f"weights must be a dict {{output name: weight}}, got {self.weights!r}")
            for k, w in items:
                if not isinstance(k, str):
                    raise TypeError(f"weights: output names must be str, got {k!r}")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ValueError(f"weights: output {k!r} must have a finite weight >= 0, got {w!r}")
            if len({k for k, _ in items}) != len(items):
                raise ValueError(f"weights names an output twice: {self.weights!r}")
            object.__setattr__(self, "weights", tuple(sorted((k, float(w)) for k, w in items)))

    def output_weights(self, names: Sequence[str]) -> Dict[str, float]:
        """Return ``{name: weight}`` for the outputs ``names`` (1 where ``weights`` does not name one).

        Raises:
            ValueError: ``weights`` names an output the model does not return, or every weight is 0.
        """
        given = dict(self.weights or ())
        stray = sorted(set(given) - set(names))
        if stray:
            raise ValueError(f"weights name outputs {stray} that forward does not return (it returns {sorted(names)})")
        out = {k: given.get(k, 1.0) for k in names}
        if not any(w > 0 for w in out.values()):
            raise ValueError(f"weights give every output weight 0: {out}")
        return out

    @property
    def learning_rate(self) -> float:
        """The learning rate at step 0 (``lr``, or its default for the optimizer and ``steps``)."""
        if self.lr is not None:
            return float(self.lr)
        return 0.5 / max(self.steps, 1) if self.optimizer == "sign" else 0.005


@dataclass
class AutoRoundResult:
    """What :func:`autoround_quantize` returns.

    Attributes:
        packed: ``{fqn: PackedWeight}`` for every layer given (tied layers share one).
        history: ``(step, selection loss)`` at every selection pass.
        best_step: the step whose parameters were packed (0: the starting point).
        train_loss: the training loss of each step.
        passes: how many times training used each training batch on average (``steps`` over the
            number of training batches). Above 2 a warning is logged: the offsets then fit the
            calibration data more than the task (on CHGNet, 400 steps over 35 batches gave 80.5
            meV/atom, 400 steps over 440 batches 55.3).
    """

    packed: Dict[str, Any]
    history: List[Tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    train_loss: List[float] = field(default_factory=list)
    passes: float = 0.0


class _FakeQuant(nn.Module):
    """The parametrization ``w -> s(r) * (clamp(round(w / s(r) + v) + z) - z)`` of one weight (STE rounding)."""

    def __init__(self, weight: torch.Tensor, config: WeightQuantConfig, ratio: Optional[torch.Tensor]) -> None:
        super().__init__()
        lay = _layout(weight.shape, config)
        self.config, self.lay = config, lay
        w = weight.detach().float().reshape(lay.rows, lay.row_len)
        pad = lay.groups * lay.block - lay.row_len
        blocks = F.pad(w, (0, pad)).reshape(lay.rows * lay.groups, lay.block)
        self.register_buffer("blocks", blocks)
        self.register_buffer("lo", blocks.amin(1))
        self.register_buffer("hi", blocks.amax(1))
        self.v = nn.Parameter(torch.zeros_like(blocks))
        r = torch.ones(blocks.shape[0], device=blocks.device) if ratio is None else ratio.to(blocks.device).float().clone()
        self.r = nn.Parameter(r)
        self.shape, self.dtype = tuple(weight.shape), weight.dtype

    def qparams(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return the scale with the stored value and a straight-through gradient, the stored scale, the zero point."""
        s, z = choose_qparams(self.lo * self.r, self.hi * self.r, self.config.bits, self.config.symmetric)
        st = _store_scale(s.detach(), self.config.scale_dtype)
        # st / 2 <= s <= st, so st - s is exact in fp32 and s + (st - s) is st itself
        return s + (st.float() - s).detach(), st, z

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        """Return the fake-quantized weight (the argument, the original weight, is held as ``blocks``)."""
        s, _, z = self.qparams()
        s1 = s.unsqueeze(1)
        safe = torch.where(s1 == 0, torch.ones_like(s1), s1)
        x = self.blocks / safe + self.v
        x = x + (torch.round(x) - x).detach()
        bits = self.config.bits
        if z is None:
            qmin, qmax, _ = qrange(bits, True)
            wq = torch.clamp(x, qmin, qmax) * s1
        else:
            qmin, qmax, _ = qrange(bits, False)
            z1 = z.unsqueeze(1)
            wq = (torch.clamp(x + z1, qmin, qmax) - z1) * s1
        lay = self.lay
        out = wq.reshape(lay.rows, lay.groups * lay.block)[:, : lay.row_len]
        return out.reshape(self.shape).to(self.dtype)

    @torch.no_grad()
    def project(self, min_ratio: float) -> None:
        """Clip ``v`` to ``[-0.5, 0.5]`` and ``r`` to ``[min_ratio, 1]``."""
        self.v.clamp_(-0.5, 0.5)
        self.r.clamp_(min_ratio, 1.0)

    @torch.no_grad()
    def codes(self):
        """Return ``(codes (rows, row_len) uint8, stored scale, zero point or None)``: what the forward computes."""
        _, st, z = self.qparams()
        s1 = st.float().unsqueeze(1)
        live = s1 != 0
        x = torch.round(self.blocks / torch.where(live, s1, torch.ones_like(s1)) + torch.where(live, self.v, torch.zeros_like(self.v)))
        if z is None:
            qmin, qmax, off = qrange(self.config.bits, True)
            c = torch.clamp(x, qmin, qmax) + off
        else:
            qmin, qmax, _ = qrange(self.config.bits, False)
            c = torch.clamp(x + z.unsqueeze(1), qmin, qmax)
        lay = self.lay
        c = c.to(torch.uint8).reshape(lay.rows, lay.groups * lay.block)[:, : lay.row_len].contiguous()
        return c, st, z


def _outputs(out: Any) -> Dict[str, torch.Tensor]:
    """Floating tensors of a model output by name, not detached (see :func:`gradcomp.batches.output_tensors`)."""
    from gradcomp.batches import output_tensors

    return output_tensors(out, detach=False)


def _mse(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if got.keys() != ref.keys():
        raise ValueError(f"forward returned outputs {sorted(got)} on the quantized model but {sorted(ref)} on the fp32 model")
    out = {}
    for k, r in ref.items():
        g = got[k]
        if g.shape != r.shape:
            raise ValueError(f"output {k!r} has shape {tuple(g.shape)} on the quantized model but {tuple(r.shape)} on the fp32 model")
        out[k] = ((g.float() - r.float()) ** 2).sum()
    return out


def autoround_quantize(
    model: nn.Module,
    layers: Sequence[Tuple[Sequence[Tuple[str, nn.Module]], WeightQuantConfig]],
    batches: Sequence[Any],
    options: AutoRound = AutoRound(),
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    hessians: Optional[Mapping[str, torch.Tensor]] = None,
    progress: bool = False,
) -> AutoRoundResult:
    """Learn rounding offsets and group ranges of ``layers`` against the model's outputs; return packed weights.

    The model is changed only while this runs (its weights are parametrized and put back, also on
    error); :func:`gradcomp.quant.quantize_` then swaps in the packed layers.

    Args:
        model: the fp32 model.
        layers: one entry per distinct weight: ``([(fqn, module), ...], config)``, every module of the
            list holding that same weight (tied layers), ``config`` an integer :class:`WeightQuantConfig`.
        batches: calibration batches (the last ``options.holdout`` ones only select the best step).
        options: see :class:`AutoRound`.
        forward: ``forward(model, batch)`` returning the outputs to match, differentiably (default:
            :func:`gradcomp.batches.call_model`); a tensor, or a dict / tuple / dataclass of tensors.
        hessians: ``{fqn: X^T X}`` of Linear layers, for ``init="awq_clip"``.
        progress: a tqdm bar over the steps.

    Returns:
        An :class:`AutoRoundResult`; ``packed`` maps every fqn of ``layers`` to its :class:`PackedWeight`.

    Raises:
        ValueError: too few batches for ``holdout``, outputs that change shape, or outputs that do not
            depend on the weights (detached, or made under ``torch.no_grad``).
    """
    from gradcomp.quant.algorithms.clip import clip_search_ratios
    from gradcomp.quant.packed import PackedWeight

    if not isinstance(options, AutoRound):
        raise TypeError(f"options must be an AutoRound, got {type(options).__name__}")
    batches = list(batches)
    if len(batches) <= options.holdout:
        raise ValueError(f"holdout={options.holdout} needs at least {options.holdout + 1} calibration batches, got {len(batches)}")
    train = batches[: len(batches) - options.holdout]
    select = batches[len(batches) - options.holdout:] if options.holdout else train
    call = forward or call_model
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    fqs: List[_FakeQuant] = []
    done: List[Tuple[nn.Module, str]] = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            ref = [{k: t.detach() for k, t in _outputs(call(model, b)).items()} for b in batches]
        power = {k: sum(float((r[k].float() ** 2).sum()) for r in ref[: len(train)]) / len(train) for k in ref[0]}
        for mods, cfg in layers:
            fqn0, m0 = mods[0]
            ratio = None
            if options.init == "awq_clip" and hessians is not None and fqn0 in hessians:
                ratio = clip_search_ratios(m0.weight, hessians[fqn0], cfg, min_ratio=options.min_ratio)
            fq = _FakeQuant(m0.weight, cfg, ratio)
            fqs.append(fq)
            for fqn, m in mods:
                parametrize.register_parametrization(m, "weight", fq, unsafe=True)
                done.append((m, fqn))
        for fq in fqs:
            fq.r.requires_grad_(options.ranges)
        params = [p for fq in fqs for p in ((fq.v, fq.r) if options.ranges else (fq.v,))]

        def errors(batch_ids) -> Dict[str, float]:
            tot: Dict[str, float] = {k: 0.0 for k in ref[0]}
            with torch.no_grad(), parametrize.cached():
                for i in batch_ids:
                    for k, e in _mse(_outputs(call(model, batches[i])), ref[i]).items():
                        tot[k] += float(e)
            return {k: v / len(batch_ids) for k, v in tot.items()}

        train_ids = list(range(len(train)))
        sel_ids = list(range(len(batches) - options.holdout, len(batches))) if options.holdout else train_ids
        if options.normalize == "initial":
            start = errors(train_ids)
            norm = {k: (start[k] if start[k] > 0 else (power[k] if power[k] > 0 else 1.0)) for k in ref[0]}
        else:
            norm = {k: (power[k] if power[k] > 0 else 1.0) for k in ref[0]}
        wts = options.output_weights(list(ref[0]))
        wsum = sum(wts.values())
        score = lambda errs: sum(wts[k] * errs[k] / norm[k] for k in errs) / wsum

        result = AutoRoundResult(packed={}, passes=options.steps / len(train_ids))
        if result.passes > 2:
            logger.warning("autoround: %d steps over %d training batches use each batch %.1f times; rounding offsets fitted "
                           "on few batches follow them rather than the task: give more calibration batches (about one "
                           "per step), fewer steps or a smaller lr", options.steps, len(train_ids), result.passes)
        best = score(errors(sel_ids))
        result.history.append((0, best))
        best_state = [p.detach().clone() for p in params]
        lr0 = options.learning_rate
        every = options.eval_every or max(1, options.steps // 10)
        adam = torch.optim.Adam(params, lr=lr0) if options.optimizer == "adam" and params else None
        for step in progress_bar(range(options.steps), progress, "autoround", total=options.steps, unit="step"):
            i = train_ids[step % len(train_ids)]
            lr = lr0 * (1.0 - step / options.steps)
            with parametrize.cached():
                errs = _mse(_outputs(call(model, batches[i])), ref[i])
                loss = sum(wts[k] * e / norm[k] for k, e in errs.items()) / wsum
            if not loss.requires_grad:
                raise ValueError("the outputs of forward(model, batch) do not depend on the quantized weights (detached, or "
                                 "computed under torch.no_grad); AutoRound needs outputs it can differentiate")
            for p in params:
                p.grad = None
            loss.backward()
            result.train_loss.append(float(loss.detach()))
            with torch.no_grad():
                if adam is not None:
                    for g in adam.param_groups:
                        g["lr"] = lr
                    adam.step()
                else:
                    for p in params:
                        if p.grad is not None:
                            p.sub_(lr * torch.sign(p.grad))
                for fq in fqs:
                    fq.project(options.min_ratio)
            if (step + 1) % every == 0 or step + 1 == options.steps:
                cur = score(errors(sel_ids))
                result.history.append((step + 1, cur))
                if cur < best:
                    best, result.best_step = cur, step + 1
                    best_state = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        logger.info("autoround: %d steps, selection loss %.4g at the start, %.4g at step %d (kept)", options.steps,
                    result.history[0][1], best, result.best_step)
        for fq, (mods, cfg) in zip(fqs, layers):
            codes, scale, zp = fq.codes()
            packed = PackedWeight.from_codes(codes, scale.reshape(-1), zp, cfg, fq.shape, fq.dtype)
            for fqn, _ in mods:
                result.packed[fqn] = packed
        return result
    finally:
        for m, _ in reversed(done):
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
