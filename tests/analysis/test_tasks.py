"""Tests of gradcomp.examples.tasks: the stdlib byte corpus, TinyGPT, batching, evaluation, the cached pretrained model."""

from __future__ import annotations

import json

import pytest
import torch

from gradcomp.examples.tasks import (
    GPT_20M,
    GPT_COMM17M,
    GPT_PRESETS,
    GPT_SMALL,
    DigitsCNN,
    GPTConfig,
    TinyGPT,
    corpus_fingerprint,
    evaluate,
    get_batch,
    make_optimizer,
    pretrained_tiny_gpt,
    split_corpus,
    stdlib_dir,
    text_corpus,
)


def test_corpus_is_deterministic_stdlib_source():
    a = text_corpus(max_bytes=1 << 16)
    b = text_corpus(max_bytes=1 << 16)
    assert a.dtype == torch.uint8 and a.numel() == 1 << 16
    assert torch.equal(a, b)
    first = sorted(stdlib_dir().glob("*.py"))[0].read_bytes()
    assert bytes(a[: min(len(first), 1000)].tolist()) == first[:1000]
    # Python source is mostly printable ASCII.
    printable = ((a >= 32) & (a < 127)) | (a == 10)
    assert printable.float().mean() > 0.95


def test_corpus_validation_and_root(tmp_path):
    with pytest.raises(ValueError, match="at least 4096"):
        text_corpus(max_bytes=100)
    with pytest.raises(TypeError, match="max_bytes"):
        text_corpus(max_bytes=1.5)
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        text_corpus(root=tmp_path)
    (tmp_path / "b.py").write_bytes(b"B" * 5000)
    (tmp_path / "a.py").write_bytes(b"A" * 5000)
    data = text_corpus(max_bytes=None, root=tmp_path)
    assert data.numel() == 10002  # each file followed by a newline, sorted order
    assert data[0] == ord("A") and data[5000] == 10 and data[5001] == ord("B")
    assert corpus_fingerprint(data) != corpus_fingerprint(data.flip(0))


def test_split_and_get_batch_shift():
    data = torch.arange(1000) % 256
    data = data.to(torch.uint8)
    train, val = split_corpus(data, 0.1)
    assert train.numel() == 900 and val.numel() == 100
    assert torch.equal(torch.cat([train, val]), data)
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(data, 0.9)
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(train, 5, 16, gen)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # windows are contiguous slices of the corpus
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 256, torch.ones(5, 15, dtype=torch.long))
    x2, _ = get_batch(train, 5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(train[:10], 2, 16)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    assert set(GPT_PRESETS) == {"small", "comm17m", "gpt20m"}
    # count the comm-bound preset analytically: no need to allocate 70 MB here
    c = GPT_COMM17M
    d = c.n_embd
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = c.vocab * d + c.block_size * d + c.bigram_vocab * d + c.n_layer * per_layer + 2 * d
    assert 16_500_000 < total < 18_000_000
    # the benchmark's headline preset: about 20M parameters, all in the blocks, no big table
    c = GPT_20M
    d = c.n_embd
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = c.vocab * d + c.block_size * d + c.n_layer * per_layer + 2 * d
    assert c.bigram_vocab == 0 and total == 19_079_168 and c.n_layer * per_layer > 0.98 * total
    small = TinyGPT.from_config(GPT_SMALL)
    d = GPT_SMALL.n_embd
    per_layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert small.num_parameters() == 256 * d + 64 * d + 2 * per_layer + 2 * d


def test_gpt20m_reaches_ddp_in_several_buckets_during_backward(tmp_path):
    # the benchmark's headline preset: with DDP's default buckets (no bucket_cap_mb), after DDP's
    # rebuild at the first step, the gradient arrives in >= 3 buckets before the last one
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from _dist import init_gloo

    init_gloo(0, 1, str(tmp_path / "init"))
    try:
        torch.manual_seed(0)
        model = TinyGPT.from_config(GPT_20M)
        ddp = DDP(model)
        calls = []

        def record(state, bucket):
            calls.append((bucket.buffer().numel(), bucket.is_last()))
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, record)
        x = torch.zeros(1, GPT_20M.block_size, dtype=torch.long)
        for _ in range(2):  # DDP rebuilds its buckets in gradient order after the first iteration
            calls.clear()
            ddp(x, x)[1].backward()
    finally:
        dist.destroy_process_group()
    assert sum(n for n, _ in calls) == model.num_parameters()
    assert len(calls) >= 4 and [last for _, last in calls] == [False] * (len(calls) - 1) + [True], calls
    assert max(n for n, _ in calls) < 0.45 * model.num_parameters()  # no bucket dominates, unlike comm17m's table


def test_tinygpt_causal_and_loss():
    torch.manual_seed(0)
    model = TinyGPT(block_size=16, n_layer=1, n_head=2, n_embd=32, bigram_vocab=1024)
    x = torch.randint(0, 256, (2, 16))
    logits, loss = model(x, torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3  # near-uniform at init
    # changing a future token must not change past logits (causality, bigram included)
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    logits2, _ = model(x2)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10], logits2[:, 10])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.lm_head.weight is model.wte.weight


def test_training_lowers_validation_loss(one_thread):
    torch.manual_seed(0)
    train, val = split_corpus(text_corpus(max_bytes=1 << 18))
    model = TinyGPT(block_size=32, n_layer=1, n_head=2, n_embd=48)
    before = evaluate(model, val, batch_size=8, max_batches=2)
    opt = make_optimizer(model, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = get_batch(train, 8, 32, gen)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate(model, val, batch_size=8, max_batches=2)
    assert model.training  # evaluate restores the mode
    assert after < before - 1.0, (before, after)
    assert evaluate(model, val, batch_size=8, max_batches=2) == after  # deterministic windows


def test_pretrained_is_cached(tmp_path, monkeypatch):
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    m1, train, val = pretrained_tiny_gpt(tmp_path, steps=3, config=cfg, batch_size=4, max_bytes=1 << 16)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["steps"] == 3 and meta["config"]["n_embd"] == 16
    assert not m1.training

    def fail(*a, **k):
        raise AssertionError("must load from the cache, not train")

    monkeypatch.setattr("gradcomp.examples.tasks.make_optimizer", fail)
    m2, _, _ = pretrained_tiny_gpt(tmp_path, steps=3, config=cfg, batch_size=4, max_bytes=1 << 16)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert m2.lm_head.weight is m2.wte.weight
    with pytest.raises(ValueError, match="steps"):
        pretrained_tiny_gpt(tmp_path, steps=0)


def test_digits_cnn_shapes_and_optional_sklearn():
    assert DigitsCNN()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    pytest.importorskip("sklearn")
    from gradcomp.examples.tasks import digits_data

    xtr, ytr, xte, yte = digits_data()
    assert xtr.shape[1:] == (1, 8, 8) and xtr.shape[0] + xte.shape[0] == 1797
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0 and set(ytr.tolist()) == set(range(10))
