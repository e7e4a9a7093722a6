"""Real training tasks that work offline on every machine: a byte-level GPT on the stdlib corpus.

The corpus is the Python standard library's own source code, read from the running interpreter's
``stdlib`` directory in sorted file order, so it needs no download and is identical on every machine
that runs the same Python version (``corpus_fingerprint`` tells two corpora apart). The model is a
small GPT-style decoder (pre-LN blocks, causal self-attention through
``F.scaled_dot_product_attention``, nanoGPT's initialisation) over the 256 byte values.

Three presets:

* ``GPT_SMALL`` (about 0.4M parameters): fast enough to train on a CPU in a minute; used by tests,
  the convergence study and ``pretrained_tiny_gpt``.
* ``GPT_20M`` (``gpt20m``, 19.1M parameters: 6 blocks of width 512, 8 heads, no extra table): the
  benchmark's headline model, shaped like the transformers people train. Its parameters are spread
  over the blocks, so with DDP's default buckets (25 MB, a 1 MB first one; the layout DDP rebuilds
  after the first step) its gradient reaches DDP in 4 buckets of 1.05M, 7.36M, 6.57M and 4.11M
  values, the first three while backward still runs (the last, with the tied embedding, at its end).
* ``GPT_COMM17M`` (about 17.6M parameters, 95% of them in a byte-bigram embedding table): a
  communication-bound model for the benchmarks. An embedding lookup costs almost nothing to compute,
  yet its gradient is a dense 16.8M-element tensor that DDP must all-reduce, so at a small batch the
  step time is dominated by the network, which is the regime where gradient compression pays. The
  table's gradient is one bucket that reaches DDP at the very end of backward.

Example::

    >>> from gradcomp.examples.tasks import text_corpus, split_corpus, TinyGPT, get_batch, GPT_SMALL
    >>> train, val = split_corpus(text_corpus(max_bytes=1 << 20))
    >>> model = TinyGPT.from_config(GPT_SMALL)
    >>> x, y = get_batch(train, 8, GPT_SMALL.block_size, torch.Generator().manual_seed(0))
    >>> loss = model(x, y)[1]           # about ln(256) = 5.55 before training

Optionally, ``digits_data`` and ``DigitsCNN`` give scikit-learn's bundled 8x8 digits with a small CNN
(scikit-learn is imported lazily and only for that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "GPTConfig",
    "GPT_SMALL",
    "GPT_COMM17M",
    "GPT_20M",
    "GPT_PRESETS",
    "TinyGPT",
    "stdlib_dir",
    "text_corpus",
    "corpus_fingerprint",
    "split_corpus",
    "get_batch",
    "evaluate",
    "make_optimizer",
    "pretrained_tiny_gpt",
    "digits_data",
    "DigitsCNN",
]

DEFAULT_CORPUS_BYTES = 4 << 20


# --------------------------------------------------------------------------------------------
# corpus


def stdlib_dir() -> Path:
    """Return the directory that holds the running interpreter's standard library sources."""
    path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return Path(path)


def _corpus_files(root: Path) -> List[Path]:
    # Top-level modules only: the package subdirectories add test data and generated tables,
    # and the top level alone holds about 4.7 MB of ordinary Python on CPython 3.11.
    return sorted(p for p in root.glob("*.py") if p.is_file())


def text_corpus(max_bytes: Optional[int] = DEFAULT_CORPUS_BYTES, root: Union[str, os.PathLike, None] = None) -> torch.Tensor:
    """Build the byte corpus from the standard library's source files.

    Files are read in sorted name order and concatenated, each followed by a newline, until
    ``max_bytes`` bytes are collected, so the result is deterministic for a given Python installation.

    Args:
        max_bytes: upper bound on the corpus length in bytes, or None for every file. At least 4096.
        root: directory to read ``*.py`` files from; defaults to ``stdlib_dir()``.

    Returns:
        A 1-D ``torch.uint8`` tensor of byte values.

    Example::

        >>> data = text_corpus(max_bytes=1 << 16)
        >>> data.dtype, data.numel()
        (torch.uint8, 65536)
    """
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int or None, got {type(max_bytes).__name__} {max_bytes!r}")
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096 so a train/validation split is possible, got {max_bytes}")
    folder = Path(root) if root is not None else stdlib_dir()
    files = _corpus_files(folder)
    if not files:
        raise FileNotFoundError(f"no *.py files found in {folder}; cannot build the stdlib corpus")
    chunks: List[bytes] = []
    total = 0
    for path in files:
        blob = path.read_bytes() + b"\n"
        chunks.append(blob)
        total += len(blob)
        if max_bytes is not None and total >= max_bytes:
            break
    raw = b"".join(chunks)
    if max_bytes is not None:
        raw = raw[:max_bytes]
    logger.debug("stdlib corpus: %d files, %d bytes from %s", len(chunks), len(raw), folder)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def corpus_fingerprint(data: torch.Tensor) -> str:
    """Return a short hex digest of a byte corpus, to tell corpora from different Pythons apart."""
    return hashlib.sha256(data.contiguous().numpy().tobytes()).hexdigest()[:12]


def split_corpus(data: torch.Tensor, val_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a corpus into a training head and a validation tail (contiguous, no shuffling).

    Args:
        data: 1-D uint8 corpus.
        val_fraction: share of bytes for validation, in (0, 0.5].

    Returns:
        ``(train, val)``, views of ``data``.

    Example: 1000 bytes with ``val_fraction=0.1`` give 900 training and 100 validation bytes.
    """
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D byte tensor, got shape {tuple(data.shape)}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n_val = max(1, int(round(data.numel() * val_fraction)))
    return data[: data.numel() - n_val], data[data.numel() - n_val :]


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random contiguous windows; the targets are the inputs shifted by one.

    Args:
        data: 1-D uint8 corpus, longer than ``block_size``.
        batch_size: number of windows.
        block_size: window length in bytes.
        generator: random generator (seed it per rank for distinct data across ranks).

    Returns:
        ``(x, y)``, both int64 of shape ``(batch_size, block_size)`` with ``y[:, t] == x[:, t + 1]``
        for ``t < block_size - 1``.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if data.numel() <= block_size + 1:
        raise ValueError(f"data has {data.numel()} bytes, need more than block_size + 1 = {block_size + 1}")
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a ``TinyGPT``.

    Args:
        vocab: vocabulary size (256 for bytes).
        block_size: longest context in tokens.
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: model width.
        dropout: dropout probability in [0, 1).
        mlp_ratio: MLP hidden width as a multiple of ``n_embd``.
        bigram_vocab: rows of an extra embedding indexed by the (previous, current) byte pair,
            hashed into ``bigram_vocab`` buckets; 0 disables it. ``vocab**2`` rows make it exact.
    """

    vocab: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    mlp_ratio: int = 4
    bigram_vocab: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.bigram_vocab, bool) or not isinstance(self.bigram_vocab, int) or self.bigram_vocab < 0:
            raise ValueError(f"bigram_vocab must be a non-negative int, got {self.bigram_vocab!r}")


GPT_SMALL = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)
GPT_COMM17M = GPTConfig(block_size=64, n_layer=1, n_head=4, n_embd=256, bigram_vocab=256 * 256)
GPT_20M = GPTConfig(block_size=64, n_layer=6, n_head=8, n_embd=512)
GPT_PRESETS: Dict[str, GPTConfig] = {"small": GPT_SMALL, "comm17m": GPT_COMM17M, "gpt20m": GPT_20M}


class _SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y))


class _MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = _SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A small GPT-style decoder over bytes (pre-LN, causal attention, tied input/output embedding).

    Initialisation follows nanoGPT: normal(0, 0.02) for linear and embedding weights, zero biases,
    and residual output projections scaled by ``1 / sqrt(2 * n_layer)``.

    Args:
        vocab, block_size, n_layer, n_head, n_embd, dropout, mlp_ratio, bigram_vocab: see ``GPTConfig``.

    Example::

        >>> model = TinyGPT(block_size=32, n_layer=1, n_head=2, n_embd=32)
        >>> logits, loss = model(torch.zeros(2, 32, dtype=torch.long), torch.zeros(2, 32, dtype=torch.long))
        >>> logits.shape
        torch.Size([2, 32, 256])
    """

    def __init__(
        self,
        vocab: int = 256,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        bigram_vocab: int = 0,
    ):
        super().__init__()
        cfg = GPTConfig(vocab, block_size, n_layer, n_head, n_embd, dropout, mlp_ratio, bigram_vocab)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.bigram = nn.Embedding(cfg.bigram_vocab, cfg.n_embd) if cfg.bigram_vocab else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @classmethod
    def from_config(cls, cfg: GPTConfig) -> "TinyGPT":
        """Build a model from a ``GPTConfig`` (or one of ``GPT_PRESETS``)."""
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        return cls(**asdict(cfg))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Return the number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(logits, loss)``; ``loss`` is the mean cross-entropy if ``targets`` is given, else None.

        Args:
            idx: int64 tokens of shape ``(batch, t)`` with ``t <= block_size``.
            targets: int64 next tokens of the same shape, or None.
        """
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length must be <= block_size={self.config.block_size}, got {t}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        if self.bigram is not None:
            # Pair each byte with its predecessor (the first one with byte 0); hash into the table.
            prev = F.pad(idx[:, :-1], (1, 0))
            x = x + self.bigram((prev * self.config.vocab + idx) % self.config.bigram_vocab)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def make_optimizer(model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.1, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """Build AdamW with weight decay on matrices and embeddings only (not on biases or LayerNorm).

    The fused implementation is used where this PyTorch has it for the parameters' device (on a CPU it
    is about 7x faster than the default loop for a 17M-parameter model); otherwise the default one.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused kernels unavailable for this device/version
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, block_size: Optional[int] = None, batch_size: int = 32, max_batches: int = 8) -> float:
    """Return the mean validation loss over fixed, evenly spaced windows of ``data``.

    The windows do not depend on any random state, so two runs evaluate on exactly the same bytes.
    The model's training/eval mode is restored afterwards.

    Args:
        model: a module returning ``(logits, loss)`` like ``TinyGPT`` (a DDP wrapper works too).
        data: 1-D uint8 validation corpus.
        block_size: window length; defaults to the model's ``config.block_size``.
        batch_size: windows per forward pass.
        max_batches: number of forward passes.

    Returns:
        Mean cross-entropy in nats per byte.
    """
    inner = getattr(model, "module", model)
    if block_size is None:
        block_size = inner.config.block_size
    n_windows = batch_size * max_batches
    last_start = data.numel() - block_size - 1
    if last_start < 0:
        raise ValueError(f"data has {data.numel()} bytes, need at least block_size + 1 = {block_size + 1}")
    starts = torch.linspace(0, last_start, n_windows).long()
    idx = starts[:, None] + torch.arange(block_size + 1)
    window = data[idx].long()
    was_training = inner.training
    inner.eval()
    try:
        losses = [inner(x, y)[1] for x, y in zip(window[:, :-1].split(batch_size), window[:, 1:].split(batch_size))]
    finally:
        inner.train(was_training)
    return float(torch.stack(losses).mean())


def _atomic_write_bytes(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def pretrained_tiny_gpt(
    cache_dir: Union[str, os.PathLike],
    steps: int = 600,
    seed: int = 0,
    config: GPTConfig = GPT_SMALL,
    batch_size: int = 32,
    lr: float = 3e-3,
    max_bytes: int = DEFAULT_CORPUS_BYTES,
) -> Tuple[TinyGPT, torch.Tensor, torch.Tensor]:
    """Return a TinyGPT trained on the stdlib corpus, training it once and caching it as safetensors.

    Training runs on the CPU with AdamW (cosine decay after a short warm-up) for ``steps`` steps; with
    the default small config a step takes about 0.13 s on one idle core, so about 80 s in all. The
    weights are cached under ``cache_dir`` in a file named after the config, steps, seed and corpus
    fingerprint, next to a JSON file with the final validation loss, so later calls load in
    milliseconds and a different Python (a different corpus) never picks up a stale model.

    Args:
        cache_dir: directory for the cached weights (created if missing).
        steps: training steps (>= 1).
        seed: seed for the initialisation and the batches.
        config: model shape, ``GPT_SMALL`` by default.
        batch_size: sequences per step.
        lr: peak learning rate.
        max_bytes: corpus size.

    Returns:
        ``(model, train_data, val_data)``; the model is in eval mode on the CPU.
    """
    from safetensors.torch import load_file, save

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    data = text_corpus(max_bytes=max_bytes)
    train, val = split_corpus(data)
    key = hashlib.sha256(json.dumps([asdict(config), steps, seed, batch_size, lr], sort_keys=True).encode()).hexdigest()[:8]
    name = f"tiny_gpt_{key}_s{seed}_n{steps}_{corpus_fingerprint(data)}"
    cache = Path(cache_dir).expanduser()
    weights_path = cache / f"{name}.safetensors"

    torch.manual_seed(seed)
    model = TinyGPT.from_config(config)
    if weights_path.exists():
        state = load_file(str(weights_path))
        state["lm_head.weight"] = state["wte.weight"]
        model.load_state_dict(state)
        logger.info("loaded cached TinyGPT from %s", weights_path)
        return model.eval(), train, val

    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = get_batch(train, batch_size, config.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            logger.info("pretrain step %d loss %.4f", step, loss.item())
    val_loss = evaluate(model, val)
    logger.info("pretrained TinyGPT in %.1f s, val loss %.4f", time.perf_counter() - t0, val_loss)

    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    meta = {"config": asdict(config), "steps": steps, "seed": seed, "val_loss": val_loss}
    _atomic_write_bytes(cache / f"{name}.json", json.dumps(meta, indent=2).encode())
    _atomic_write_bytes(weights_path, save(state, metadata={"gradcomp": json.dumps(meta)}))
    return model.eval(), train, val


# --------------------------------------------------------------------------------------------
# optional: scikit-learn digits


def digits_data(test_fraction: float = 0.2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load scikit-learn's bundled 8x8 digits as tensors, split into train and test.

    Args:
        test_fraction: share of the 1797 images held out, in (0, 1).
        seed: seed of the shuffle before the split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images are float32 ``(n, 1, 8, 8)`` scaled to [0, 1],
        labels int64 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"digits_data needs scikit-learn, which is not installed ({exc}); install it with: pip install scikit-learn") from exc
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(x.shape[0] * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 conv layers, max-pool, and a linear classifier.

    Example::

        >>> DigitsCNN()(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, channels: int = 32, n_classes: int = 10):
        super().__init__()
        if channels < 1 or n_classes < 2:
            raise ValueError(f"channels must be >= 1 and n_classes >= 2, got {channels} and {n_classes}")
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images of shape ``(n, 1, 8, 8)``."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))
