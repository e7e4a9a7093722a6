"""Checks of a hook checkpoint: everything a ``state_dict`` holds is validated before anything changes.

:func:`validate_state_dict` checks keys, types, the step, the world size and rank, each residual's
dtype and length against its recorded bucket layout, finiteness, the CRC-32 checksums recorded at
save time (:func:`checksums_of`) and DDP's recorded bucket layout; :func:`check_checkpoint_config`
refuses a checkpoint of other wire options. Every error names the key and what was expected.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from gradcomp.comm.budget import BudgetVerdict

__all__ = ["check_checkpoint_config", "checksums_of", "residual_checksum", "validate_state_dict"]


def residual_checksum(t: torch.Tensor) -> str:
    """Return the CRC-32 of a CPU tensor's bytes as 8 hex digits (what ``state_dict`` records per residual)."""
    data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(memoryview(data)) & 0xFFFFFFFF:08x}"


_REQUIRED = ("config", "world_size", "rank", "step", "param_keys", "bucket_keys", "bucket_numels",
             "worker_residuals", "server_residuals", "network_fit")
_OPTIONAL = ("checksums", "stats", "format", "layout", "residuals_rotated", "budget")


def _int(value: Any, what: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"checkpoint {what} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"checkpoint {what} must be >= {minimum}, got {value}")
    return value


def _int_list(value: Any, what: str, minimum: Optional[int] = None) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"checkpoint {what} must be a list of ints, got {type(value).__name__}")
    return tuple(_int(v, f"{what}[{i}]", minimum) for i, v in enumerate(value))


def _index_dict(value: Any, what: str) -> Dict[int, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"checkpoint {what} must be a dict keyed by bucket index, got {type(value).__name__}")
    out: Dict[int, Any] = {}
    for k, v in value.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            raise TypeError(f"checkpoint {what} keys must be bucket indices (ints), got {k!r}") from None
        if isinstance(k, bool) or key < 0 or (isinstance(k, str) and str(key) != k):
            raise ValueError(f"checkpoint {what} keys must be bucket indices >= 0, got {k!r}")
        out[key] = v
    return out


def check_checkpoint_config(saved: Any, config: Any) -> None:
    """Refuse a checkpoint whose wire options (``saved``, a ``HookConfig`` as a dict) differ from ``config``'s.

    The residuals are laid out for the width, the block size, error feedback, the chunks and the node
    layout; a checkpoint of other options cannot be resumed. (A malformed ``saved`` is left to
    :func:`validate_state_dict`.)
    """
    if not isinstance(saved, dict):
        return
    for name in ("bits", "format", "block_size", "error_feedback", "chunk_numel"):
        if (name != "format" or name in saved) and saved.get(name) != getattr(config, name):
            raise ValueError(f"checkpoint has {name}={saved.get(name)!r}, this state has {name}={getattr(config, name)!r}")
    topo = asdict(config.topology) if config.topology is not None else None
    if saved.get("topology") != topo:
        raise ValueError(
            f"checkpoint has topology={saved.get('topology')!r}, this state has topology={topo!r} "
            "(the residuals are laid out for the node layout)"
        )


def validate_state_dict(sd: Any, *, world_size: int, rank: int, residual_sizes: Callable[[Tuple[int, ...], Tuple[int, ...]], Tuple[int, int]],
                        num_params: Optional[Sequence[int]]) -> Dict[str, Any]:
    """Check a hook ``state_dict`` completely and return its parsed content; change nothing.

    Args:
        sd: what ``QuantizedAllReduceState.state_dict`` returned (perhaps after a trip through a file).
        world_size, rank: of the state loading it.
        residual_sizes: ``(keys, numels) -> (worker length, server length)`` for this state's layout.
        num_params: numel of each tracked parameter by index (None: the state tracks no model).

    Returns:
        ``{"step", "bucket_keys", "bucket_numels", "worker", "server"}`` with int keys and tuples,
        and the residual tensors as stored (not copied).

    Raises:
        TypeError / ValueError: naming the key and what was expected.
    """
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict made by QuantizedAllReduceState.state_dict(), got {type(sd).__name__}")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"checkpoint is missing key(s) {missing}; expected a dict made by QuantizedAllReduceState.state_dict()")
    extra = sorted(str(k) for k in sd if k not in _REQUIRED + _OPTIONAL)
    if extra:
        raise ValueError(f"checkpoint has unknown key(s) {extra}; expected {sorted(_REQUIRED + _OPTIONAL)}")
    if not isinstance(sd["config"], dict):
        raise TypeError(f"checkpoint config must be a dict, got {type(sd['config']).__name__}")
    saved_world = _int(sd["world_size"], "world_size", 1)
    saved_rank = _int(sd["rank"], "rank", 0)
    if saved_world != world_size or saved_rank != rank:
        raise ValueError(f"checkpoint is for rank {saved_rank} of {saved_world}, this state is rank {rank} of {world_size}")
    step = _int(sd["step"], "step", 0)
    if sd["param_keys"] not in ("index", "identity"):
        raise ValueError(f"checkpoint param_keys must be 'index' or 'identity', got {sd['param_keys']!r}")
    if sd["network_fit"] is not None and not isinstance(sd["network_fit"], dict):
        raise TypeError(f"checkpoint network_fit must be a dict or None, got {type(sd['network_fit']).__name__}")
    if sd.get("stats") is not None:
        if not isinstance(sd["stats"], dict):
            raise TypeError(f"checkpoint stats must be a dict, got {type(sd['stats']).__name__}")
        for k, v in sd["stats"].items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"checkpoint stats[{k!r}] must be a number, got {type(v).__name__} {v!r}")
    keys = {k: _int_list(v, f"bucket_keys[{k}]") for k, v in _index_dict(sd["bucket_keys"], "bucket_keys").items()}
    numels = {k: _int_list(v, f"bucket_numels[{k}]", 1) for k, v in _index_dict(sd["bucket_numels"], "bucket_numels").items()}
    worker = _index_dict(sd["worker_residuals"], "worker_residuals")
    server = _index_dict(sd["server_residuals"], "server_residuals")
    for name, d in (("bucket_numels", numels), ("worker_residuals", worker), ("server_residuals", server)):
        if set(d) != set(keys):
            raise ValueError(f"checkpoint {name} covers buckets {sorted(d)}, bucket_keys covers {sorted(keys)}")
    seen: Dict[int, int] = {}
    for b in sorted(keys):
        if len(keys[b]) != len(numels[b]) or not keys[b]:
            raise ValueError(f"checkpoint bucket {b} lists {len(keys[b])} parameter keys and {len(numels[b])} sizes; expected the same, >= 1")
        for key, n in zip(keys[b], numels[b]):
            if key in seen:
                raise ValueError(f"checkpoint parameter key {key} appears in buckets {seen[key]} and {b}; a parameter lives in one bucket")
            seen[key] = b
            if sd["param_keys"] == "index" and num_params is not None:
                if not 0 <= key < len(num_params):
                    raise ValueError(f"checkpoint bucket {b} names parameter {key}; the model has parameters 0..{len(num_params) - 1}")
                if num_params[key] != n:
                    raise ValueError(f"checkpoint bucket {b} gives parameter {key} {n} elements; the model's has {num_params[key]}")
    checksums = sd.get("checksums")
    if keys and checksums is None:
        raise ValueError("checkpoint has residuals but no checksums; save it with this gradcomp version's state_dict()")
    if checksums is not None:
        if not isinstance(checksums, dict) or set(checksums) != {"worker_residuals", "server_residuals"}:
            raise ValueError("checkpoint checksums must be a dict with 'worker_residuals' and 'server_residuals'")
    for name, d in (("worker_residuals", worker), ("server_residuals", server)):
        sums = _index_dict(checksums[name], f"checksums[{name}]") if checksums is not None else {}
        if checksums is not None and set(sums) != set(d):
            raise ValueError(f"checkpoint checksums[{name}] covers buckets {sorted(sums)}, the residuals cover {sorted(d)}")
        for b, t in d.items():
            expected = residual_sizes(keys[b], numels[b])[0 if name == "worker_residuals" else 1]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"checkpoint {name}[{b}] must be a tensor, got {type(t).__name__}")
            if t.layout != torch.strided or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != expected:
                raise ValueError(
                    f"checkpoint {name}[{b}] must be a dense 1-D float32 tensor of {expected} elements (the layout of "
                    f"bucket {b}'s {len(keys[b])} parameters on this topology), got {t.layout} {t.dtype} of shape {tuple(t.shape)}"
                )
            cpu = t.detach().cpu()
            if not bool(torch.isfinite(cpu).all()):
                bad = int((~torch.isfinite(cpu)).sum())
                raise ValueError(f"checkpoint {name}[{b}] holds {bad} non-finite value(s); residuals are always finite")
            if checksums is not None and residual_checksum(cpu) != sums[b]:
                raise ValueError(
                    f"checkpoint {name}[{b}] does not match its checksum (crc32 {residual_checksum(cpu)}, recorded "
                    f"{sums[b]!r}): the file was corrupted or edited"
                )
    layout = _layout(sd.get("layout"), sd["param_keys"], num_params)
    rotated = {}
    if sd.get("residuals_rotated") is not None:
        rotated = _index_dict(sd["residuals_rotated"], "residuals_rotated")
        if set(rotated) != set(keys) or any(not isinstance(v, bool) for v in rotated.values()):
            raise ValueError(f"checkpoint residuals_rotated must map each residual's bucket {sorted(keys)} to a bool, got {sd['residuals_rotated']!r}")
    budget = {}
    if sd.get("budget") is not None:
        budget = {k: BudgetVerdict.from_dict(v) if isinstance(v, dict) else _bad_verdict(k, v)
                  for k, v in _index_dict(sd["budget"], "budget").items()}
    return {"step": step, "bucket_keys": keys, "bucket_numels": numels, "worker": worker, "server": server, "layout": layout,
            "rotated": rotated, "budget": budget}


def _bad_verdict(index: int, value: Any):
    raise TypeError(f"checkpoint budget[{index}] must be a dict (an error-budget verdict), got {type(value).__name__} {value!r}")


def _layout(value: Any, param_keys: str, num_params: Optional[Sequence[int]]) -> Optional[Tuple[Tuple[int, Tuple[int, ...], Tuple[int, ...]], ...]]:
    """Parse a checkpoint's ``layout``: ``[[bucket index, [keys], [sizes]], ...]`` of DDP's last step, or None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"checkpoint layout must be a list of [bucket index, keys, sizes], got {type(value).__name__}")
    out, seen = [], {}
    for i, entry in enumerate(value):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise TypeError(f"checkpoint layout[{i}] must be [bucket index, keys, sizes], got {entry!r}")
        b = _int(entry[0], f"layout[{i}] bucket index", 0)
        keys, numels = _int_list(entry[1], f"layout[{i}] keys"), _int_list(entry[2], f"layout[{i}] sizes", 1)
        if len(keys) != len(numels) or not keys:
            raise ValueError(f"checkpoint layout[{i}] lists {len(keys)} keys and {len(numels)} sizes; expected the same, >= 1")
        for key, n in zip(keys, numels):
            if key in seen:
                raise ValueError(f"checkpoint layout names parameter {key} in buckets {seen[key]} and {b}; a parameter lives in one bucket")
            seen[key] = b
            if param_keys == "index" and num_params is not None and not (0 <= key < len(num_params) and num_params[key] == n):
                raise ValueError(f"checkpoint layout gives parameter {key} {n} elements; the model has no such parameter")
        out.append((b, keys, numels))
    return tuple(out)


def checksums_of(worker: Dict[int, torch.Tensor], server: Dict[int, torch.Tensor]) -> Dict[str, Dict[int, str]]:
    """Return the ``checksums`` entry of a state dict for these (CPU) residuals."""
    return {
        "worker_residuals": {k: residual_checksum(v) for k, v in worker.items()},
        "server_residuals": {k: residual_checksum(v) for k, v in server.items()},
    }
