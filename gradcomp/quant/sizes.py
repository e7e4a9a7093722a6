"""Size accounting: the bytes a weight or a model really holds, scales and zero points counted."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from gradcomp.checks import check_int
from gradcomp.codec import packed_nbytes
from gradcomp.quant.configs import SCALE_DTYPES, CastConfig, Config, Rules, WeightQuantConfig, _check_config, config_name
from gradcomp.quant.layout import _layout
from gradcomp.quant.modules import _plan

__all__ = ["weight_nbytes", "weight_bits_per_param", "model_size_bytes", "predict_model_size_bytes", "size_table"]


def weight_nbytes(config: Optional[Config], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Return the bytes a weight of ``shape`` holds under ``config``: codes, scales and zero points.

    Args:
        config: the config, or None for the weight as it is (``dtype``).
        shape: the weight's shape.
        dtype: the dtype of an unquantized weight (only used when ``config`` is None).

    Returns:
        Exact bytes, equal to :attr:`PackedWeight.nbytes` of a weight quantized with ``config``.

    Example: int4 g128 symmetric fp16 scales on ``(4096, 4096)``: ``8388608 + 4096*32*2 = 8650752``.
    """
    numel = math.prod(int(s) for s in shape)
    if config is None:
        return numel * torch.empty((), dtype=dtype).element_size()
    _check_config(config)
    if isinstance(config, CastConfig):
        return numel * 2
    lay = _layout(shape, config)
    blocks = lay.rows * lay.groups
    zp = 0 if config.symmetric else packed_nbytes(blocks, config.bits)
    return packed_nbytes(lay.numel, config.bits) + blocks * SCALE_DTYPES[config.scale_dtype].itemsize + zp


def weight_bits_per_param(config: Optional[Config], shape: Sequence[int]) -> float:
    """Return the real cost in bits per weight of ``config`` on a weight of ``shape``, overheads counted.

    Example:
        >>> weight_bits_per_param(WeightQuantConfig(bits=4, granularity="per_group", group_size=128), (4096, 4096))
        4.125
        >>> weight_bits_per_param(WeightQuantConfig(bits=8), (4096, 4096))   # one fp16 scale per row
        8.00390625
    """
    numel = math.prod(int(s) for s in shape)
    if numel == 0:
        raise ValueError(f"shape must have at least one element, got {tuple(shape)}")
    return 8.0 * weight_nbytes(config, shape) / numel


def _unique_tensors(model: nn.Module) -> List[torch.Tensor]:
    seen = set()
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Return the bytes the model actually holds: parameters and buffers, each shared tensor once.

    Packed codes, scales and zero points are buffers of the quantized layers, so they are counted
    as stored. For a saved model this equals the tensor bytes of the safetensors file.

    Example: ``nn.Linear(256, 64)`` in fp32 holds ``(256*64 + 64) * 4 = 65792`` bytes; after
    ``quantize_`` with int4 g128 symmetric fp16 scales it holds ``8192 + 64*2*2 + 64*4 = 8704``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def predict_model_size_bytes(model: nn.Module, config_or_rules: Rules, *, filter_fn=None, method=None) -> int:
    """Return what :func:`model_size_bytes` will give after ``quantize_(model, config_or_rules)``, without quantizing.

    The arithmetic is :func:`weight_nbytes` per selected layer; a weight that another, unselected
    module still holds stays counted, and layers sharing a weight and a config count it once.

    ``method`` is the one ``quantize_`` will use. Every method but ``awq_scale`` stores exactly
    what round-to-nearest stores, so the prediction is exact. ``awq_scale`` also stores a per-input
    fp32 scale (4 bytes per input channel) for each integer-coded Linear where its search picks a
    scale, which depends on the calibration data: the prediction then counts it for every such
    layer, an upper bound that the result meets or undercuts.
    """
    from gradcomp.quant.algorithms import AWQScale, resolve_method

    plan = _plan(model, config_or_rules, filter_fn)
    scaled = isinstance(resolve_method(method), AWQScale)
    swapped = {id(m) for _, m, _ in plan}
    held: Dict[int, torch.Tensor] = {}
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None or (id(m) in swapped and name == "weight"):
                continue
            held[id(t)] = t
    total = sum(t.numel() * t.element_size() for t in held.values())
    packed = {(id(m.weight), cfg): weight_nbytes(cfg, m.weight.shape)
              + (4 * m.weight.shape[1] if scaled and isinstance(m, nn.Linear) and isinstance(cfg, WeightQuantConfig) else 0)
              for _, m, cfg in plan}
    return total + sum(packed.values())


def size_table(num_params: int, configs: Optional[Sequence[Optional[Config]]] = None, *, row_length: int = 4096) -> List[Dict[str, Any]]:
    """Return what ``num_params`` weights cost at each precision, scale overhead included.

    The weights are taken as rows of ``row_length`` inputs (a model whose layers have that input
    width); the arithmetic is that of :func:`weight_nbytes`, i.e. of the modules that are really built.

    Args:
        num_params: number of weights (e.g. ``7e9``).
        configs: configs to list (None entries mean fp32); default fp32, fp16, int8 per channel,
            int4 g128 (sym and asym), int3 g128, int2 g64.
        row_length: inputs per row.

    Returns:
        Rows ``{"config", "bits_per_weight", "bytes", "GB", "GiB", "vs_fp32"}``.

    Example: 7e9 weights in int4 g128 with fp16 scales: 4.125 bits each, 3.61 GB (not 3.5).
    """
    if isinstance(num_params, bool) or not isinstance(num_params, (int, float)) or num_params < 1:
        raise ValueError(f"num_params must be a positive number, got {num_params!r}")
    check_int("row_length", row_length)
    n = int(num_params)
    if configs is None:
        configs = [None, CastConfig("fp16"), WeightQuantConfig(bits=8),
                   WeightQuantConfig(bits=4, granularity="per_group", group_size=128),
                   WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False),
                   WeightQuantConfig(bits=3, granularity="per_group", group_size=128),
                   WeightQuantConfig(bits=2, granularity="per_group", group_size=64, symmetric=False)]
    rows_full, rest = divmod(n, row_length)
    rows = []
    for cfg in configs:
        nbytes = 0
        if rows_full:
            nbytes += weight_nbytes(cfg, (rows_full, row_length))
        if rest:
            nbytes += weight_nbytes(cfg, (1, rest))
        rows.append({
            "config": config_name(cfg),
            "bits_per_weight": 8.0 * nbytes / n,
            "bytes": nbytes,
            "GB": nbytes / 1e9,
            "GiB": nbytes / 2**30,
            "vs_fp32": nbytes / (4.0 * n),
        })
    return rows
