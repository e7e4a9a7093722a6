"""Tests of gradcomp.batches: the one batch, output, loss and progress convention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from gradcomp.batches import call_model, default_loss, output_loss, output_tensor, progress_bar, run_batches


class _Args(nn.Module):
    def forward(self, x, y=None, *, scale=1.0):
        return (x * scale, (x * scale).sum()) if y is not None else x * scale


def test_call_model_by_batch_kind():
    m, x = _Args(), torch.ones(2)
    assert torch.equal(call_model(m, x), x)
    logits, loss = call_model(m, (x, x))
    assert float(loss) == 2.0
    assert torch.equal(call_model(m, {"x": x, "scale": 3.0}), 3 * x)
    with pytest.raises(TypeError, match=r"calling the model as model\(\*batch\) failed.*pass loss_fn"):
        call_model(nn.Identity(), (x, x))


def test_output_tensor_and_loss():
    t, s = torch.ones(3), torch.tensor(2.0)
    assert output_tensor(t) is t and output_tensor((t, s)) is t
    assert output_tensor(SimpleNamespace(logits=t)) is t and output_tensor({"logits": t}) is t
    assert output_loss(s) is s and output_loss((t, s)) is s and output_loss({"loss": s}) is s
    assert output_loss(t) is None and output_loss((t,)) is None
    with pytest.raises(TypeError, match="model output must be a tensor"):
        output_tensor("text")
    with pytest.raises(TypeError, match="pass loss_fn"):
        default_loss(_Args(), torch.ones(2))


def test_run_batches_restores_mode_and_counts():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    seen = []
    n = run_batches(m, [torch.ones(1, 2)] * 5, forward=lambda mod, b: seen.append(mod.training), num_batches=3)
    assert n == 3 and seen == [False] * 3 and m.training
    with pytest.raises(RuntimeError):
        run_batches(m, [torch.ones(1, 3)])
    assert m.training


def test_progress_bar_passes_items_through():
    assert list(progress_bar(range(4), False, "x")) == [0, 1, 2, 3]
    assert list(progress_bar(range(4), True, "x", total=4)) == [0, 1, 2, 3]
