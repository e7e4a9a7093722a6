"""Per-layer rules: which config a layer gets, chosen by its fully qualified name.

A pattern is an exact name, a glob (``"blocks.*.mlp.*"``; ``*`` also crosses dots) or
``"re:<regex>"`` (full match). Rules are ordered; the first matching rule wins.
"""

from __future__ import annotations

import fnmatch
import re
from typing import List, Mapping, Optional, Tuple

from gradcomp.quant.configs import CastConfig, Config, Rules, WeightQuantConfig, _check_config

__all__ = ["resolve_config"]


def _normalize_rules(config_or_rules: Rules) -> List[Tuple[str, Optional[Config]]]:
    if isinstance(config_or_rules, (WeightQuantConfig, CastConfig)):
        return [("*", config_or_rules)]
    if isinstance(config_or_rules, Mapping):
        items = list(config_or_rules.items())
    elif isinstance(config_or_rules, (list, tuple)):
        items = list(config_or_rules)
    else:
        raise TypeError(
            f"config_or_rules must be a WeightQuantConfig, a CastConfig or a list of (pattern, config or None), "
            f"got {type(config_or_rules).__name__}"
        )
    rules = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"rule {i} must be a (pattern, config or None) pair, got {item!r}")
        pattern, cfg = item
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"rule {i}: pattern must be a non-empty str, got {pattern!r}")
        if cfg is not None:
            _check_config(cfg, f"rule {i} ({pattern!r}) config")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"rule {i}: invalid regular expression {pattern[3:]!r}: {exc}") from exc
        rules.append((pattern, cfg))
    return rules


def _matches(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(fqn, pattern)
    return pattern == fqn


def resolve_config(fqn: str, config_or_rules: Rules) -> Tuple[bool, Optional[Config]]:
    """Return ``(matched, config)`` for the layer named ``fqn`` under a config or ordered rules.

    A pattern is an exact fully qualified name, a glob (``"blocks.*.mlp.*"``; ``*`` also crosses
    dots) or ``"re:<regex>"`` (full match). The first matching rule wins; its config may be None
    (keep in full precision). ``matched`` is False when no rule matches.

    Example:
        >>> resolve_config("blocks.0.mlp.fc", [("re:.*attn.*", None), ("blocks.*", WeightQuantConfig(bits=4))])
        (True, WeightQuantConfig(bits=4, ...))
    """
    for pattern, cfg in _normalize_rules(config_or_rules):
        if _matches(pattern, fqn):
            return True, cfg
    return False, None
