"""Resume is bit-exact with every default option: DDP's initial buckets in a new process change nothing."""

from __future__ import annotations

import pytest

from _dist import spawn
from _models import check_default_resume


def _resume_worker(rank, world_size, opts):
    check_default_resume(rank, opts, split=12, end=16)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, opts", [
    (2, {}), (2, {"bits": 4}), (3, {"bits": 4}), (3, {"bits": 8, "stochastic_rounding": True}),
    (2, {"format": "int2r"}), (3, {"format": "mxfp4"}), (2, {"format": "fp8_e4m3", "stochastic_rounding": True}),
], ids=["defaults-P2", "int4-P2", "int4-P3", "int8-stochastic-P3", "int2r-P2", "mxfp4-P3", "fp8_e4m3-stochastic-P2"])
def test_resume_with_default_options_is_bit_exact(tmp_path, world_size, opts):
    spawn(_resume_worker, world_size, tmp_path, opts, timeout=300)


def _resume_in_warmup_worker(rank, world_size):
    # a checkpoint taken during the warm-up: the plain all-reduces must sum DDP's rebuilt buckets as before
    check_default_resume(rank, {"bits": 4}, split=4, end=14)


@pytest.mark.slow
def test_resume_from_the_warmup_is_bit_exact_on_three_ranks(tmp_path):
    spawn(_resume_in_warmup_worker, 3, tmp_path, timeout=300)


def _policy_worker(rank, world_size):
    import gradcomp
    from gradcomp.comm.policy import LinkFit, NetworkFit, PolicyConfig
    from gradcomp.comm.cost import CodecThroughput

    codec = CodecThroughput(2e9, 2e9, "given")
    fit = NetworkFit(LinkFit(5e-4, 1.25e8), codec=((8, codec), (4, codec)))  # 1 Gbit/s: compression pays for the large bucket
    check_default_resume(rank, {}, split=12, end=16,
                         make_state=lambda ddp: gradcomp.register(ddp, policy=PolicyConfig(fit=fit)))


@pytest.mark.slow
def test_resume_with_the_policy_is_bit_exact(tmp_path):
    spawn(_policy_worker, 2, tmp_path, timeout=300)


def _hierarchical_worker(rank, world_size):
    import gradcomp
    from gradcomp.comm.topology import Topology

    check_default_resume(rank, {}, split=12, end=16,
                         make_state=lambda ddp: gradcomp.register(ddp, bits=4, topology=Topology(local_world_size=2)))


@pytest.mark.slow
def test_resume_in_hierarchical_mode_is_bit_exact(tmp_path):
    spawn(_hierarchical_worker, 4, tmp_path, timeout=300)
