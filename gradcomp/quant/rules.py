"""Per-layer rules: the one way gradcomp picks layers by name.

A pattern is matched against a module's fully qualified name (``"blocks.0.mlp.fc"``):

1. ``"re:<regex>"``: the regex must match the whole name (``re.fullmatch``);
2. a pattern holding ``*``, ``?`` or ``[`` is a shell glob (``fnmatchcase``; ``*`` also crosses dots);
3. anything else must equal the name exactly.

Rules are ordered ``(pattern, value)`` pairs and the first matching rule wins. The same matcher
chooses the config of a layer in :func:`gradcomp.quant.quantize_` and
:func:`gradcomp.quant.quantize_state_dict`, the layers of activation quantization and capture
(``names=`` / ``exclude=``), and the rules of :func:`gradcomp.mixed_precision.plan_from_rules`.

Example:
    >>> rules = normalize_rules([("lm_head", None), ("re:blocks\\.\\d+\\.attn\\..*", "int8"), ("*", "int4")])
    >>> first_match(rules, "blocks.0.attn.q")
    (1, 'int8')
    >>> first_match(rules, "blocks.0.mlp.fc")
    (2, 'int4')
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from gradcomp.quant.configs import CastConfig, Config, Rules, WeightQuantConfig, _check_config

__all__ = ["match_pattern", "check_patterns", "normalize_rules", "first_match", "specificity", "resolve_config"]

_GLOB_CHARS = frozenset("*?[")


def _check_pattern(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"{where}: pattern must be a non-empty str (exact name, glob or 're:<regex>'), got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"{where}: invalid regular expression {pattern[3:]!r}: {exc}") from exc
    return pattern


def match_pattern(pattern: str, name: str) -> bool:
    """Return whether ``pattern`` (exact name, glob or ``re:<regex>``) matches the name ``name``.

    Example:
        >>> match_pattern("blocks.*.mlp.c_fc", "blocks.1.mlp.c_fc"), match_pattern("re:blocks\\.\\d+\\.attn.*", "blocks.0.attn.c_proj")
        (True, True)
        >>> match_pattern("head", "lm_head")
        False
    """
    _check_pattern(pattern, "match_pattern")
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def check_patterns(patterns: Union[None, str, Sequence[str]], what: str = "pattern") -> List[str]:
    """Validate one pattern or a list of them; return them as a list (``[]`` for None).

    Raises:
        TypeError: a pattern is not a non-empty str.
        ValueError: a ``re:`` pattern does not compile.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{what} must be a str or a list of str, got {type(patterns).__name__}")
    return [_check_pattern(p, f"{what} {p!r}") for p in patterns]


def normalize_rules(
    rules: Union[Sequence[Tuple[str, Any]], Mapping[str, Any]],
    check_value: Optional[Callable[[Any, str], None]] = None,
) -> List[Tuple[str, Any]]:
    """Validate ordered rules and return them as a list of ``(pattern, value)`` pairs.

    Args:
        rules: a list of ``(pattern, value)`` pairs, or a dict (its order is the rule order).
        check_value: optional ``check_value(value, where)`` that raises for a bad value.

    Raises:
        TypeError: ``rules`` is not a list or dict of pairs, or a pattern is not a non-empty str.
        ValueError: a ``re:`` pattern does not compile.
    """
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, (list, tuple)):
        items = list(rules)
    else:
        raise TypeError(f"rules must be a list of (pattern, value) pairs or a dict, got {type(rules).__name__}")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"rule {i} must be a (pattern, value) pair, got {item!r}")
        pattern, value = item
        _check_pattern(pattern, f"rule {i}")
        if check_value is not None:
            check_value(value, f"rule {i} ({pattern!r})")
        out.append((pattern, value))
    return out


def first_match(rules: Sequence[Tuple[str, Any]], names: Union[str, Iterable[str]]) -> Optional[Tuple[int, Any]]:
    """Return ``(index, value)`` of the first rule that matches ``names`` (a name or its aliases), or None."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for i, (pattern, value) in enumerate(rules):
        if any(match_pattern(pattern, n) for n in names):
            return i, value
    return None


def specificity(pattern: str) -> Tuple[int, int]:
    """Rank a pattern for "most specific rule wins": exact name > glob (more literal characters first) > regex."""
    if pattern.startswith("re:"):
        return (0, 0)
    if _GLOB_CHARS & set(pattern):
        return (1, len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern)))
    return (2, len(pattern))


def _check_rule_config(cfg: Any, where: str) -> None:
    if cfg is not None:
        _check_config(cfg, f"{where} config")


def _config_rules(config_or_rules: Rules) -> List[Tuple[str, Optional[Config]]]:
    """Rules of weight configs: one config stands for ``[("*", config)]``."""
    if isinstance(config_or_rules, (WeightQuantConfig, CastConfig)):
        return [("*", config_or_rules)]
    if not isinstance(config_or_rules, (Mapping, list, tuple)):
        raise TypeError(
            f"config_or_rules must be a WeightQuantConfig, a CastConfig or a list of (pattern, config or None), "
            f"got {type(config_or_rules).__name__}"
        )
    return normalize_rules(config_or_rules, _check_rule_config)


def resolve_config(fqn: str, config_or_rules: Rules) -> Tuple[bool, Optional[Config]]:
    """Return ``(matched, config)`` for the layer named ``fqn`` under a config or ordered rules.

    The first matching rule wins; its config may be None (keep in full precision). ``matched`` is
    False when no rule matches.

    Example:
        >>> resolve_config("blocks.0.mlp.fc", [("re:.*attn.*", None), ("blocks.*", WeightQuantConfig(bits=4))])
        (True, WeightQuantConfig(bits=4, ...))
    """
    hit = first_match(_config_rules(config_or_rules), fqn)
    return (False, None) if hit is None else (True, hit[1])
