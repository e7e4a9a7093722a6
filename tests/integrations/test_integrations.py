"""The hook inside the frameworks people train with: Lightning, accelerate, the HF Trainer (2 gloo ranks each).

Each framework test trains a tiny model on 2 CPU processes, checkpoints through the framework's own
mechanism (which writes the file from rank 0 only), resumes in fresh objects, and checks that the
resumed run ends bit-identical to the uninterrupted one, with the compression ratio in the logs.
Two runs per framework:

* ``HOOK`` (``warmup_steps=1, min_compress_numel=0``): a 67.9K-parameter model whose every bucket is
  compressed from the second step, for the logs and the checkpoint format;
* every gradcomp option at its default (``..._with_default_options``): the 280K-parameter MLP of
  ``_models._mlp``, whose DDP buckets change between a process's first step (one bucket, compressed
  after the warm-up) and the rebuilt ones (a 12,654-value bucket under ``min_compress_numel``, sent
  plain, and a large compressed one); the checkpoint is taken after the 10 warm-up steps and
  compressed steps follow the resume; parameters and the byte counters must match bit for bit.
A framework that cannot be imported skips its test and says why (the `lightning`, `accelerate`
and `hf` extras install them; `scripts/setup.sh --extras` installs all three, and CI runs it).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import gradcomp
from gradcomp.comm.checkpoint import FORMAT, gather_state_dict, load_gathered_state_dict
from gradcomp.integrations import metrics

from _dist import init_gloo, spawn
from _models import _all_identical, _mlp, _model

HOOK = dict(warmup_steps=1, min_compress_numel=0)


def _need(module: str, extra: str):
    try:
        importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - CI installs the extras
        pytest.skip(f"{module} cannot be imported ({e}); install it with pip install 'gradcomp[{extra}]' "
                    "(bash scripts/setup.sh --extras installs every framework)")


def _dataset(n: int = 64, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 129, generator=g), torch.randint(0, 7, (n,), generator=g))


def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _mlp_dataset(n: int, seed: int = 11):
    """Inputs and classes for ``_models._mlp`` (37 features, 10 classes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 37, generator=g), torch.randint(0, 10, (n,), generator=g))


# the byte counters a resumed run must reproduce exactly
COUNTERS = ("step", "bytes_sent_step", "fp32_bytes_step", "bytes_sent_total", "fp32_bytes_total", "compressed_buckets_step", "buckets_step")


def _check_default_run(stats: dict, steps: int) -> None:
    """The uninterrupted default-option run met what the test is about: DDP's rebuilt buckets are one small
    plain bucket and one compressed bucket in the last step, and the warm-up is over."""
    assert stats["step"] == steps, stats
    assert (stats["compressed_buckets_step"], stats["buckets_step"]) == (1, 2), (
        f"expected DDP's rebuilt layout (one bucket under min_compress_numel, one compressed), got {stats}")
    assert stats["bytes_sent_step"] < stats["fp32_bytes_step"], stats


def _check_resumed(params: torch.Tensor, expected: torch.Tensor, resumed: dict, uninterrupted: dict, what: str) -> None:
    """The resumed run ends with the uninterrupted run's parameters, bit for bit, and its byte counters."""
    diff = float((params - expected).abs().max())
    wrong = {k: (resumed[k], uninterrupted[k]) for k in COUNTERS if resumed[k] != uninterrupted[k]}
    assert diff == 0.0 and not wrong, (
        f"{what}: the run resumed with default options ends {diff:.3g} (max |diff|) from the uninterrupted one; "
        f"counters that differ (resumed, uninterrupted): {wrong}")
    assert _all_identical(params)


def _torchrun_env(rank: int, world_size: int) -> None:
    """The variables a launcher sets; the process group already exists (file rendezvous), so no port is used."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))


# ---------------------------------------------------------------------------------------------
# Lightning


def _lightning_worker(rank, world_size, out):
    os.environ["LOCAL_RANK"] = str(rank)  # Lightning's own environment: processes started outside, group exists
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gradcomp.integrations.lightning import GradcompCallback

    class Net(L.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.net = _model(seed)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def fit(seed, epochs, callbacks, ckpt_path=None):
        trainer = L.Trainer(
            accelerator="cpu", devices=world_size, strategy="ddp", max_epochs=epochs, callbacks=callbacks,
            logger=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )
        module = Net(seed)
        loader = torch.utils.data.DataLoader(_dataset(), batch_size=8)  # Lightning shards it: 4 steps per epoch
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer, module

    # uninterrupted: 4 epochs; Lightning's ModelCheckpoint writes one file per epoch, from rank 0 only
    ckpt_dir = os.path.join(out, "ckpt")
    cb = GradcompCallback(bits=8, **HOOK)
    trainer, module = fit(0, 4, [cb, ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)])
    expected, stats = _params(module), cb.state.stats()
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert logged["gradcomp/compression_ratio"] > 3.5, logged
    assert logged["gradcomp/bytes_sent_step"] == stats["bytes_sent_step"]
    assert stats["step"] == 16

    # resume from the file written after epoch 2 into fresh objects (other initial weights)
    cb2 = GradcompCallback(bits=8, **HOOK)
    _, module2 = fit(123, 4, [cb2], ckpt_path=os.path.join(ckpt_dir, "epoch=1.ckpt"))
    assert torch.equal(_params(module2), expected), "Lightning resume diverged from the uninterrupted run"
    assert _all_identical(_params(module2))
    resumed = cb2.state.stats()
    for key in ("step", "bytes_sent_total", "fp32_bytes_total"):
        assert resumed[key] == stats[key], (key, resumed[key], stats[key])


@pytest.mark.slow
def test_lightning_fit_resume_bit_exact_with_logged_ratio(tmp_path):
    _need("lightning", "lightning")
    spawn(_lightning_worker, 2, tmp_path, str(tmp_path), timeout=240)


def _lightning_defaults_worker(rank, world_size, out):
    os.environ["LOCAL_RANK"] = str(rank)
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gradcomp.integrations.lightning import GradcompCallback

    class Net(L.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.net = _mlp(seed)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def fit(seed, callbacks, ckpt_path=None):
        trainer = L.Trainer(
            accelerator="cpu", devices=world_size, strategy="ddp", max_epochs=4, callbacks=callbacks,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )
        module = Net(seed)
        trainer.fit(module, torch.utils.data.DataLoader(_mlp_dataset(64), batch_size=8), ckpt_path=ckpt_path)  # 4 steps per epoch
        return module

    ckpt_dir = os.path.join(out, "ckpt")
    cb = GradcompCallback()  # every option at its default
    module = fit(0, [cb, ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)])
    expected, stats = _params(module), cb.state.stats()
    _check_default_run(stats, 16)

    # resume from the file written after epoch 3 (12 steps: the warm-up is over) into fresh objects
    cb2 = GradcompCallback()
    module2 = fit(123, [cb2], ckpt_path=os.path.join(ckpt_dir, "epoch=2.ckpt"))
    _check_resumed(_params(module2), expected, cb2.state.stats(), stats, "Lightning")


@pytest.mark.slow
def test_lightning_resume_bit_exact_with_default_options(tmp_path):
    _need("lightning", "lightning")
    spawn(_lightning_defaults_worker, 2, tmp_path, str(tmp_path), timeout=240)


# ---------------------------------------------------------------------------------------------
# accelerate


def _accelerate_worker(rank, world_size, out):
    _torchrun_env(rank, world_size)
    from accelerate import Accelerator

    import gradcomp.integrations.accelerate as ga

    def setup(seed):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = _model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = torch.utils.data.DataLoader(_dataset(), batch_size=8)
        model, opt, loader = acc.prepare(model, opt, loader)
        state = ga.register(acc, model, bits=8, **HOOK)
        return acc, model, opt, loader, state

    def train(acc, model, opt, loader, epochs):
        for _ in epochs:
            for x, y in loader:
                with acc.accumulate(model):
                    acc.backward(nn.functional.cross_entropy(model(x), y))
                    opt.step()
                    opt.zero_grad()

    acc, model, opt, loader, state = setup(0)
    train(acc, model, opt, loader, range(2))
    acc.save_state(os.path.join(out, "state"))
    train(acc, model, opt, loader, range(2, 4))
    expected, stats = _params(model), state.stats()
    assert stats["step"] == 8, "4 batches per rank and epoch, 2 accumulated per optimizer step: 2 exchanges per epoch"
    m = metrics(state)
    assert m["gradcomp/compression_ratio"] > 3.5, m
    # accelerate writes custom objects from the main process only: the file holds every rank's state
    saved = torch.load(os.path.join(out, "state", "custom_checkpoint_0.pkl"), weights_only=False)
    assert saved["format"] == FORMAT and [e["rank"] for e in saved["ranks"]] == [0, 1]

    acc, model, opt, loader, state = setup(123)
    acc.load_state(os.path.join(out, "state"))
    train(acc, model, opt, loader, range(2, 4))
    assert torch.equal(_params(model), expected), "accelerate resume diverged from the uninterrupted run"
    assert _all_identical(_params(model))
    assert state.stats()["bytes_sent_total"] == stats["bytes_sent_total"]


@pytest.mark.slow
def test_accelerate_accumulation_save_load_state_bit_exact(tmp_path):
    _need("accelerate", "accelerate")
    spawn(_accelerate_worker, 2, tmp_path, str(tmp_path), timeout=240)


def _accelerate_defaults_worker(rank, world_size, out):
    _torchrun_env(rank, world_size)
    from accelerate import Accelerator

    import gradcomp.integrations.accelerate as ga

    def setup(seed):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = _mlp(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(_mlp_dataset(128), batch_size=8)  # 8 batches per rank: 4 exchanges per epoch
        model, opt, loader = acc.prepare(model, opt, loader)
        return acc, model, opt, loader, ga.register(acc, model)  # every option at its default

    def train(acc, model, opt, loader, epochs):
        for _ in epochs:
            for x, y in loader:
                with acc.accumulate(model):
                    acc.backward(nn.functional.cross_entropy(model(x), y))
                    opt.step()
                    opt.zero_grad()

    acc, model, opt, loader, state = setup(0)
    train(acc, model, opt, loader, range(3))
    acc.save_state(os.path.join(out, "state"))  # after 12 exchanges: the warm-up is over
    assert state.stats()["step"] == 12
    train(acc, model, opt, loader, range(3, 4))
    expected, stats = _params(model), state.stats()
    _check_default_run(stats, 16)

    acc, model, opt, loader, state = setup(123)
    acc.load_state(os.path.join(out, "state"))
    train(acc, model, opt, loader, range(3, 4))
    _check_resumed(_params(model), expected, state.stats(), stats, "accelerate")


@pytest.mark.slow
def test_accelerate_resume_bit_exact_with_default_options(tmp_path):
    _need("accelerate", "accelerate")
    spawn(_accelerate_defaults_worker, 2, tmp_path, str(tmp_path), timeout=240)


# ---------------------------------------------------------------------------------------------
# HF Trainer


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=16, vocab=64):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_worker(rank, world_size, out):
    _torchrun_env(rank, world_size)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import gradcomp.integrations.hf as ghf

    def run(resume=None):
        torch.manual_seed(0 if resume is None else 123)
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        args = TrainingArguments(
            output_dir=out, use_cpu=True, per_device_train_batch_size=4, max_steps=6, logging_steps=1,
            save_strategy="steps", save_steps=3, report_to=[], disable_tqdm=True, ddp_find_unused_parameters=False, seed=0, learning_rate=1e-3,
        )
        trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=_Tokens())
        cb = ghf.register(trainer, bits=8, **HOOK)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cb

    trainer, cb = run()
    expected, stats = _params(trainer.model), cb.state.stats()
    ratios = [h["gradcomp/compression_ratio"] for h in trainer.state.log_history if "gradcomp/compression_ratio" in h]
    # 3.5x, not 3.9x: each of GPT-2's 26 small tensors starts on a block boundary, and padding travels too
    assert ratios and ratios[-1] > 3.0, trainer.state.log_history
    hook_file = os.path.join(out, "checkpoint-3", ghf.HOOK_FILE)
    assert [e["rank"] for e in torch.load(hook_file, weights_only=True)["ranks"]] == [0, 1]

    trainer2, cb2 = run(resume=os.path.join(out, "checkpoint-3"))
    assert torch.equal(_params(trainer2.model), expected), "HF Trainer resume diverged from the uninterrupted run"
    assert cb2.state.stats()["bytes_sent_total"] == stats["bytes_sent_total"]
    assert _all_identical(_params(trainer2.model))


@pytest.mark.slow
def test_hf_trainer_callback_logs_ratio_and_resumes_bit_exact(tmp_path):
    _need("transformers", "hf")
    spawn(_hf_worker, 2, tmp_path, str(tmp_path), timeout=240)


class _MLPForTrainer(nn.Module):
    """``_models._mlp`` as the HF Trainer wants a model: keyword inputs, a dict with the loss."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = _mlp(seed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _MLPRows(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.x, self.y = _mlp_dataset(n).tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_defaults_worker(rank, world_size, out):
    _torchrun_env(rank, world_size)
    from transformers import Trainer, TrainingArguments

    import gradcomp.integrations.hf as ghf

    def run(folder, find_unused, resume=None):
        # 64 rows, 4 per rank and step: 8 steps per epoch; the checkpoint after step 12 is in the middle
        # of the second epoch, so the resumed Trainer also skips the batches it has seen. The Trainer's
        # own optimizer (AdamW) and learning-rate schedule.
        args = TrainingArguments(
            output_dir=folder, use_cpu=True, per_device_train_batch_size=4, max_steps=16, save_strategy="steps",
            save_steps=12, report_to=[], disable_tqdm=True, seed=0, learning_rate=1e-3, ddp_find_unused_parameters=find_unused,
        )
        trainer = Trainer(model=_MLPForTrainer(0 if resume is None else 123), args=args, train_dataset=_MLPRows())
        cb = ghf.register(trainer)  # every option at its default
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cb

    # find_unused_parameters=False (the usual setting for speed): DDP starts from one bucket in every new
    # process and rebuilds after its first step. The Trainer's own default (None: True for a model
    # without gradient checkpointing) keeps DDP's initial buckets for good.
    for find_unused in (False, None):
        folder = os.path.join(out, f"find_unused_{find_unused}")
        trainer, cb = run(folder, find_unused)
        expected, stats = _params(trainer.model), cb.state.stats()
        _check_default_run(stats, 16)
        opt = trainer.optimizer
        assert isinstance(getattr(opt, "optimizer", opt), torch.optim.AdamW), type(opt)

        trainer2, cb2 = run(folder, find_unused, resume=os.path.join(folder, "checkpoint-12"))
        _check_resumed(_params(trainer2.model), expected, cb2.state.stats(), stats, f"HF Trainer (ddp_find_unused_parameters={find_unused})")


@pytest.mark.slow
def test_hf_trainer_resume_bit_exact_with_default_options(tmp_path):
    _need("transformers", "hf")
    spawn(_hf_defaults_worker, 2, tmp_path, str(tmp_path), timeout=240)


# ---------------------------------------------------------------------------------------------
# one process: the gathered checkpoint format, statistics in the state, missing frameworks


@pytest.fixture
def world1(tmp_path):
    init_gloo(0, 1, str(tmp_path / "init"))
    yield
    dist.destroy_process_group()


def test_gathered_state_round_trip_keeps_statistics(world1):
    state = gradcomp.QuantizedAllReduceState(bits=8)
    state.step = 5
    state.statistics.load({"bytes_sent_total": 1234})
    blob = gather_state_dict(state)
    assert blob["format"] == FORMAT and blob["world_size"] == 1 and blob["ranks"][0]["stats"]["bytes_sent_total"] == 1234
    fresh = gradcomp.QuantizedAllReduceState(bits=8)
    load_gathered_state_dict(fresh, blob)
    assert fresh.step == 5 and fresh.stats()["bytes_sent_total"] == 1234


def test_gathered_state_refuses_wrong_input(world1):
    state = gradcomp.QuantizedAllReduceState(bits=8)
    with pytest.raises(TypeError, match="gather_state_dict"):
        load_gathered_state_dict(state, state.state_dict())
    blob = gather_state_dict(state)
    blob["world_size"], blob["ranks"] = 2, blob["ranks"] * 2
    with pytest.raises(ValueError, match="hook states of 2 ranks, this job has 1"):
        load_gathered_state_dict(state, blob)
    with pytest.raises(TypeError, match="QuantizedAllReduceState"):
        gather_state_dict(object())


@pytest.mark.parametrize(
    "module,blocked,extra",
    [
        ("gradcomp.integrations.accelerate", ["accelerate"], "accelerate"),
        ("gradcomp.integrations.hf", ["transformers"], "hf"),
        ("gradcomp.integrations.lightning", ["lightning", "pytorch_lightning"], "lightning"),
    ],
)
def test_missing_framework_names_the_extra(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    if blocked[0] == "lightning":
        monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'gradcomp\[{extra}\]'"):
        importlib.import_module(module)


def test_import_gradcomp_pulls_no_framework():
    code = "import sys, gradcomp, gradcomp.integrations; print([m for m in ('lightning', 'pytorch_lightning', 'accelerate', 'transformers') if m in sys.modules])"
    import subprocess

    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "[]", got.stdout


def test_callback_refuses_bad_options_before_fit():
    _need("lightning", "lightning")
    from gradcomp.integrations.lightning import GradcompCallback

    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        GradcompCallback(bits=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bucket'\]"):
        GradcompCallback(bucket=3)
