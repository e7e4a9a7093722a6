"""The exchange's steps in one process: plans, chunks, bytes, error feedback, headers, and fused == eager."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from gradcomp import codec
from gradcomp.codec import compiling, kernels
from gradcomp.comm.plan import ShardLayout
from gradcomp.codec.formats import HEADER_BYTES, format_names, wire_format
from gradcomp.codec.kernels import reference as ref
from gradcomp.comm.exchange import HeaderMismatch, check_header, decode, decode_sum, encode, exchange_local
from gradcomp.comm.buffers import ROUTE_REDUCE_SCATTER, ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan

B = 256
NUMELS = (300, 512, 256, 1000, 2048, 7, 9 * B)  # ragged tails, one-block runs, runs that merge


def _run(plan, xs, ef=True, noise=False, fused=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = plan.world_size
    res = [torch.randn(plan.padded_numel, generator=g) * 0.01 for _ in range(P)] if ef else None
    if ef:  # padding carries no residual
        for r in res:
            pad = torch.ones(plan.padded_numel, dtype=torch.bool)
            pad[plan.to_aligned(torch.ones(plan.numel)).bool()] = False
            r[pad] = 0
    sres = [torch.zeros(plan.server_numel) for _ in range(P)] if ef else None
    nz = [torch.rand(plan.padded_numel, generator=g) for _ in range(P)] if noise else None
    snz = [torch.rand(plan.server_numel, generator=g) for _ in range(P)] if noise else None
    res_in = [r.clone() for r in res] if ef else None
    out, finite = exchange_local(plan, xs, residuals=res, server_residuals=sres, noises=nz, server_noises=snz, fused=fused)
    return out, finite, res_in, res, sres


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_sum_is_the_rank_order_sum_of_the_decoded_copies(dtype):
    """decode_sum writes exactly shard k's values: sum over p of rank p's decoded gradient, in order, scaled."""
    P, bits = 3, 8
    plan = ExchangePlan.build(NUMELS, P, bits, B, chunk_numel=None)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(plan.numel, generator=g) for _ in range(P)]
    sent = []
    for x in xs:
        bufs = ExchangeBuffers.allocate(plan, need=ROUTE_REDUCE_SCATTER)
        assert bufs.gathered == [] and bufs.mine == []  # a reduce-scatter has no all-gather buffers
        sent.append(encode(plan, bufs, 0, x).clone())
    m = plan.chunks[0].message_bytes
    # every value's shard: its aligned block over the blocks per shard
    shard_of = (plan.to_aligned(torch.arange(plan.numel, dtype=torch.float32) + 1).long() - 1).view(-1, B)
    owner = torch.empty(plan.numel, dtype=torch.long)
    blocks = torch.arange(shard_of.shape[0]).unsqueeze(1).expand_as(shard_of)
    keep = shard_of >= 0
    owner[shard_of[keep]] = blocks[keep] // plan.chunks[0].shard_blocks
    for divide, factor in ((P, None), (1, 0.3)):
        ref = torch.zeros(plan.numel)
        for p in range(P):  # rank p's whole gradient as its codes say, summed in rank order
            mine_p = torch.empty(plan.numel)
            decode(plan, bufs, 0, mine_p, gathered=sent[p])
            ref = ref + mine_p
        ref = ref / divide if factor is None else ref * torch.tensor(factor)
        for k in range(P):
            bufs = ExchangeBuffers.allocate(plan, need=ROUTE_REDUCE_SCATTER)
            bufs.recv[0].view(P, m).copy_(torch.stack([s.view(P, m)[k] for s in sent]))  # the all-to-all
            out = torch.full((plan.numel,), float("nan"), dtype=dtype)
            finite = decode_sum(plan, bufs, 0, k, out, divide=divide, factor=factor)
            mine = owner == k
            assert bool(finite) and torch.equal(out[mine], ref[mine].to(dtype)), f"shard {k} differs"
            assert out[~mine].isnan().all(), "decode_sum wrote outside its shard"
            # an offset output: just the shard's positions
            lo, hi = int(mine.nonzero().min()), int(mine.nonzero().max()) + 1
            part = torch.full((hi - lo,), float("nan"), dtype=dtype)
            decode_sum(plan, bufs, 0, k, part, offset=lo, divide=divide, factor=factor)
            assert torch.equal(part, out[lo:hi])
    with pytest.raises(ValueError, match="rank must be"):
        decode_sum(plan, bufs, 0, P, out)


@pytest.mark.parametrize("P", [2, 3])
def test_plan_chunks_shards_and_bytes(P):
    for bits in format_names():
        whole = ExchangePlan.build(NUMELS, P, bits, B, chunk_numel=None)
        assert len(whole.chunks) == 1
        assert whole.layout == ShardLayout(sum(-(-n // B) * B for n in NUMELS), P, bits, B)
        for chunk in (B, 3 * B, 1000, 10**7):
            plan = ExchangePlan.build(NUMELS, P, bits, B, chunk_numel=chunk)
            # chunks are whole multiples of P blocks except the last: the padding of one shard cut
            assert plan.padded_numel == whole.padded_numel and plan.server_numel == whole.server_numel
            for c in plan.chunks[:-1]:
                assert c.real_blocks == P * c.shard_blocks
            assert plan.bytes_sent == plan.layout.bytes_sent + 2 * (P - 1) * HEADER_BYTES * len(plan.chunks)
            # every value of the bucket is read exactly once
            covered = torch.zeros(plan.numel, dtype=torch.int32)
            for c in plan.chunks:
                for src, _, nb in c.full:
                    assert nb >= 2 and covered[src : src + nb * B].eq(0).all()
                    covered[src : src + nb * B] += 1
                for src, _, n in c.staged:
                    covered[src : src + n] += 1
            assert covered.eq(1).all()
    with pytest.raises(ValueError, match=r"format must be one of \(2, 4, 8\), got 3 \(or name a format"):
        ExchangePlan.build(NUMELS, 2, 3, B)
    with pytest.raises(ValueError, match="numels must be a non-empty sequence"):
        ExchangePlan.build((), 2, 8, B)


@pytest.mark.parametrize("P", [2, 3])
def test_error_feedback_invariant_and_chunking_changes_no_bit(P):
    torch.manual_seed(P)
    xs = [torch.randn(sum(NUMELS)) for _ in range(P)]
    for bits in format_names():
        results = []
        rotate = wire_format(bits).rotate
        for chunk in (None, B, 5 * B):
            plan = ExchangePlan.build(NUMELS, P, bits, B, chunk_numel=chunk)
            out, finite, res_in, res, sres = _run(plan, xs)
            assert finite
            # mean of (x + r_in) == out + mean of r_out + server residuals, in the aligned layout, at every
            # value of the bucket. A rotated format's residuals live in the rotated space (rotated back here):
            # there a ragged block's padding carries part of the error too, which nobody receives, so the
            # invariant holds at the bucket's values, not at the padding
            back = (lambda v: kernels.rotate_blocks(v.view(-1, B), inverse=True).view(-1)) if rotate else (lambda v: v)
            valid = plan.to_aligned(torch.ones(plan.numel)).bool()
            want = sum(plan.to_aligned(x) + back(r) for x, r in zip(xs, res_in)) / P
            got = plan.to_aligned(out) + back(sum(res) / P + plan.server_to_aligned(torch.stack(sres)))
            assert torch.allclose(got[valid], want[valid], atol=1e-5, rtol=0), bits
            results.append((out, res, sres, plan))
        # a block's arithmetic does not depend on the chunks: same outputs and residuals, bit for bit
        for out, res, sres, plan in results[1:]:
            assert torch.equal(out, results[0][0])
            assert all(torch.equal(a, b) for a, b in zip(res, results[0][1]))
            aligned = plan.server_to_aligned(torch.stack(sres))
            assert torch.equal(aligned, results[0][3].server_to_aligned(torch.stack(results[0][2])))


def test_no_error_feedback_touches_no_residual_and_nonfinite_reaches_everyone():
    plan = ExchangePlan.build(NUMELS, 3, 4, B, chunk_numel=2 * 3 * B)
    xs = [torch.randn(plan.numel) for _ in range(3)]
    out, finite, *_ = _run(plan, xs, ef=False)
    assert finite and torch.isfinite(out).all()
    xs[2][1200] = float("inf")
    out, finite, *_ = _run(plan, xs, ef=False)
    assert not finite and not torch.isfinite(out).all()


def test_header_names_the_step_and_bucket_of_a_rank_out_of_step():
    plan = ExchangePlan.build(NUMELS, 2, 8, B, chunk_numel=4 * B)
    bufs = ExchangeBuffers.allocate(plan)
    x = torch.randn(plan.numel)
    send = encode(plan, bufs, 1, x, header=(7, 3))
    check_header(plan, 1, send, 7, 3)
    m = plan.chunks[1].message_bytes
    late = encode(plan, ExchangeBuffers.allocate(plan), 1, x, header=(8, 3))
    mixed = torch.cat([send.view(2, m)[0], late.view(2, m)[1]])
    with pytest.raises(HeaderMismatch, match=r"rank 1 sent step 8, bucket 3, chunk 1, format int8.*expected step 7, bucket 3, chunk 1, format int8"):
        check_header(plan, 1, mixed, 7, 3)


def test_a_peer_in_a_format_of_the_same_size_is_caught_by_the_header():
    """int4 and int4r messages have the same bytes; only the header id tells them apart (and mxfp4's differ in size)."""
    x = torch.randn(sum(NUMELS))
    plain = ExchangePlan.build(NUMELS, 2, "int4", B, chunk_numel=4 * B)
    rotated = ExchangePlan.build(NUMELS, 2, "int4r", B, chunk_numel=4 * B)
    assert [c.message_bytes for c in plain.chunks] == [c.message_bytes for c in rotated.chunks]
    mine = encode(plain, ExchangeBuffers.allocate(plain), 0, x, header=(3, 1))
    theirs = encode(rotated, ExchangeBuffers.allocate(rotated), 0, x, header=(3, 1))
    m = plain.chunks[0].message_bytes
    mixed = torch.cat([mine.view(2, m)[0], theirs.view(2, m)[1]])
    with pytest.raises(HeaderMismatch, match=r"rank 1 sent step 3, bucket 1, chunk 0, format int4r.*expected .* format int4,"):
        check_header(plain, 0, mixed, 3, 1)


# ---------------------------------------------------------------------------------------------
# every backend == eager, bit for bit, for every kernel the hook runs


def _edge_rows(rows: int, block: int, fmt) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, block, generator=g)
    x[0] = 0.0  # an all-zero block
    if fmt.is_float:  # values landing on exact ties of the element grid (scale 1: the block's absmax is the max)
        vals = ref.element_values(fmt)
        grid = vals[torch.isfinite(vals) & (vals >= 0)].sort().values
        mids = (grid[1:] + grid[:-1]) / 2
        x[1] = mids[torch.randint(0, mids.numel(), (block,), generator=g)] * torch.where(torch.rand(block, generator=g) < 0.5, -1.0, 1.0)
        x[1, 0] = fmt.max_code
    else:
        qmax = fmt.qmax
        s = 2.0**-7  # exact scale: x / scale lands on halves, ties to even
        x[1] = (torch.randint(-qmax, qmax, (block,), generator=g) + 0.5) * s
        x[1, 0] = qmax * s
    x[2] *= 1e33  # huge values (a rotated block sums them: below fp32's limit)
    x[3] *= 1e-38  # tiny: subnormal scales
    x[4, 3] = float("inf")
    x[5, 7] = float("nan")
    x[6, :] = -x[6, 0].abs()  # a constant block
    x[7, :: 2] = 0.0  # half zeros, half Gaussian
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any nan equals any nan (the sign of a nan is not specified)."""
    if a.dtype.is_floating_point:
        both_nan = torch.isnan(a) & torch.isnan(b)
        a, b = torch.where(both_nan, 0, a), torch.where(both_nan, 0, b)
        ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


from gradcomp.codec.kernels import native  # noqa: E402

# (backend, instruction set): every native instruction set this CPU runs, and torch.compile
BACKENDS = [("native", isa) for isa in native.isas()] + [pytest.param(("compiled", None), marks=pytest.mark.slow)]


@pytest.fixture
def on_backend(request):
    """Force a backend (and a native instruction set) for the test; restore the best one after."""
    name, isa = request.param
    if name == "compiled" and not codec.compile_available():
        pytest.skip("torch.compile unavailable")
    if isa is not None:
        native.use_isa(isa)
    try:
        yield name
    finally:
        if native.available():
            native.use_isa(native.isas()[0])


def _check_backend_matches_eager(name, fmt, dtype=torch.float32):
    fmt = wire_format(fmt)
    rows = 9
    x = _edge_rows(rows, B, fmt).to(dtype)
    res = torch.randn(rows, B) * 1e-3
    res[4:6] = 0
    nbytes = B * fmt.bits // 8

    def enc(backend, noise=None, in_place=False):
        r_in = res.clone()
        r_out = r_in if in_place else torch.full_like(res, 12345.0)  # every value must be written
        with kernels.force(backend):
            codes, scale = codec.encode_blocks(x, fmt, residual=r_in, residual_out=r_out, noise=noise)
        return codes, scale, r_out

    for noise in (None, torch.rand(rows, B, generator=torch.Generator().manual_seed(1))):
        for in_place in (False, True):
            e, c = enc("eager", noise, in_place), enc(name, noise, in_place)
            assert all(_same_bits(a, b) for a, b in zip(e, c)), f"encode differs ({fmt.name}, {dtype}, in place {in_place})"
    codes, scale, _ = enc("eager")
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        outs = []
        for backend in ("eager", name):
            with kernels.force(backend):
                outs.append(codec.decode_blocks(codes, scale, fmt, out=torch.empty(rows, B, dtype=out_dtype)))
        assert _same_bits(*outs), f"decode differs ({fmt.name}, {out_dtype})"
    P = 3
    many = torch.stack([codes, torch.roll(codes, 1, 0), torch.flip(codes, (0,))])  # (P, rows, bytes)
    scales = torch.stack([scale, torch.roll(scale, 1, 0), torch.flip(scale, (0,))])
    # received messages are strided views of a byte buffer
    sb = scales[0].numel() * scales.element_size()
    buf = torch.zeros(P, rows * nbytes + sb + 8, dtype=torch.uint8)
    buf[:, : rows * nbytes] = many.view(P, -1)
    buf[:, rows * nbytes : rows * nbytes + sb] = scales.reshape(P, -1).view(torch.uint8)
    codes_v = buf[:, : rows * nbytes].view(P, rows, nbytes)
    scales_v = buf[:, rows * nbytes : rows * nbytes + sb].view(scales.dtype).view(scales.shape)
    outs = []
    for backend in ("eager", name):
        r_out = torch.empty(rows, B)
        with kernels.force(backend):
            outs.append(codec.reduce_blocks(codes_v, scales_v, fmt, residual=res, residual_out=r_out) + (r_out,))
    assert all(_same_bits(a, b) for a, b in zip(*outs)), f"reduce differs ({fmt.name})"
    finite_rows = torch.tensor([bool(kernels.scales_finite(scales[:, r], fmt)) for r in range(rows)]) if fmt.scale == "fp32" else None
    if finite_rows is not None:  # a row with a non-finite copy reduces to a non-finite scale
        assert torch.equal(~torch.isfinite(outs[0][1]), ~finite_rows)
    for out, divide, factor in ((torch.empty(rows, B), 3, None), (torch.empty(rows, B, dtype=torch.bfloat16), 1, torch.tensor(0.3))):
        sums = []
        for backend in ("eager", name):
            with kernels.force(backend):
                sums.append(codec.decode_sum_blocks(codes_v, scales_v, fmt, out=out.clone(), divide=divide, factor=factor))
        assert _same_bits(*sums), f"decode_sum differs ({fmt.name}, {out.dtype})"


# torch.compile builds graphs per format: the integer widths in the suite; the rotated formats (int2r:
# about two minutes of Inductor on 2 cores; the rotated MX path, e8m0 scales and float codes: over
# ten) run with GRADCOMP_TEST_ALL_COMPILED=1. On CUDA, register() checks every compiled kernel
# against the eager one before the first step whatever the format, and falls back to eager with a
# warning.
COMPILED_FORMATS = ("int8", "int4", "int2")
COMPILED_HEAVY = ("int2r", "mxfp8r")
_heavy = [pytest.mark.timeout(3600), pytest.mark.skipif(
    os.environ.get("GRADCOMP_TEST_ALL_COMPILED") != "1",
    reason="rotated formats through torch.compile: set GRADCOMP_TEST_ALL_COMPILED=1 (2 to over 10 minutes each on 2 cores)")]
KERNEL_CASES = [pytest.param(b, f, id=f"{f}-{'-'.join(x for x in b if x)}") for b in BACKENDS[:-1] for f in format_names()] + [
    pytest.param(("compiled", None), f, marks=pytest.mark.slow, id=f"{f}-compiled") for f in COMPILED_FORMATS
] + [pytest.param(("compiled", None), f, marks=[pytest.mark.slow, *_heavy], id=f"{f}-compiled") for f in COMPILED_HEAVY]


@pytest.mark.usefixtures("one_thread")  # as under torchrun (OMP_NUM_THREADS=1), where a miscompile showed once
@pytest.mark.parametrize("on_backend,fmt", KERNEL_CASES, indirect=["on_backend"])
def test_fused_kernels_match_eager_bitwise(on_backend, fmt):
    for dtype in (torch.float32, torch.bfloat16, torch.float16) if on_backend == "native" else (torch.float32,):
        _check_backend_matches_eager(on_backend, fmt, dtype)


@pytest.mark.parametrize("on_backend", BACKENDS[:-1], indirect=True, ids=lambda b: "-".join(x for x in b if x))
def test_every_float_code_decodes_as_the_reference(on_backend):
    """Every code of every float element format, the OCP nan and inf patterns included (the encoder never makes them)."""
    from gradcomp.codec.packing import pack_codes

    for fmt in (wire_format(n) for n in format_names()):
        if not fmt.is_float:
            continue
        n = 1 << fmt.bits
        codes8 = torch.arange(n, dtype=torch.uint8).repeat(2 * B // n).view(-1, B)
        codes = pack_codes(codes8.reshape(-1), fmt.bits).view(codes8.shape[0], -1)
        rows = codes.shape[0]
        scale = torch.full((rows,), 0.75) if fmt.scale == "fp32" else torch.full(kernels.scale_shape(fmt, rows, B), 127, dtype=torch.uint8)
        outs = []
        for backend in ("eager", on_backend):
            with kernels.force(backend):
                outs.append(codec.decode_blocks(codes, scale, fmt, out=torch.empty(rows, B)))
        assert _same_bits(*outs), fmt.name
        if not fmt.rotate:  # the values themselves: torch's float8 tables (E2M1: the OCP table), times the scale
            want = ref.element_values(fmt)[codes8.long()] * (0.75 if fmt.scale == "fp32" else 1.0)
            assert _same_bits(outs[1], want), fmt.name


@pytest.mark.parametrize("on_backend", BACKENDS[:-1], indirect=True, ids=lambda b: "-".join(x for x in b if x))
@pytest.mark.parametrize("P", [2, 3])
def test_whole_exchange_is_bit_identical_on_every_native_instruction_set(on_backend, P):
    g = torch.Generator().manual_seed(P)
    xs = [torch.randn(sum(NUMELS), generator=g) for _ in range(P)]
    for fmt in format_names():
        plan = ExchangePlan.build(NUMELS, P, fmt, B, chunk_numel=5 * B)
        for noise in (False, True):
            want = _run(plan, xs, noise=noise, fused=False)
            got = _run(plan, xs, noise=noise)
            assert all(_same_bits(a, b) for a, b in zip((want[0], *want[3], *want[4]), (got[0], *got[3], *got[4]))), fmt


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.skipif(not codec.compile_available(), reason="torch.compile unavailable")
def test_compiled_reduce_after_in_place_calls_of_two_widths_writes_residual_out(monkeypatch):
    # the policy's probe runs the kernels with in-place residuals at 8 then 4 bits; the hook then runs
    # them with residuals apart. torch 2.13 reused the aliased 4-bit graph for that call and wrote the
    # new residual into the input (the self-check rejected the 4-bit kernels); fresh kernels here
    monkeypatch.setattr(compiling, "_COMPILED", {})
    torch._dynamo.reset()
    P, rows = 4, 6

    def call(bits, in_place, compiled):
        g = torch.Generator().manual_seed(bits)
        codes = torch.randint(0, 256, (P, rows, B * bits // 8), dtype=torch.uint8, generator=g)
        scale = torch.rand(P, rows, generator=g)
        base = torch.rand(rows * B, generator=g) * 1e-2
        if in_place:  # two views of one buffer, as exchange.reduce_shard passes an in-place residual
            rin, rout = base.view(-1, B)[:rows], base.view(-1, B)[:rows]
        else:
            rin, rout = base.view(-1, B), torch.full((rows, B), float("nan"))
        with kernels.force("compiled" if compiled else "eager"):
            c, s = codec.reduce_blocks(codes, scale, bits, residual=rin, residual_out=rout)
        return c, s, rout, base

    for bits, in_place in ((8, True), (4, True), (4, False)):
        want, got = call(bits, in_place, False), call(bits, in_place, True)
        names = ("codes", "scale", "residual_out", "residual_in")
        assert [n for n, a, b in zip(names, want, got) if not _same_bits(a, b)] == [], f"{bits} bits, in place {in_place}"


def test_compile_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiling, "_COMPILED", {})
    monkeypatch.setattr(compiling, "_COMPILE_FAILED", set())
    monkeypatch.setattr(compiling, "_WARNED", [])
    plan = ExchangePlan.build(NUMELS, 2, 8, B, chunk_numel=4 * B)
    xs = [torch.randn(plan.numel) for _ in range(2)]
    want, _, *_ = _run(plan, xs, fused=False)
    with caplog.at_level(logging.WARNING, logger="gradcomp.codec"), kernels.force("compiled"):
        got, _, *_ = _run(plan, xs)  # compiled asked for: the eager kernels answer
        again, _, *_ = _run(plan, xs)
    assert torch.equal(got, want) and torch.equal(again, want)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage(), [r.getMessage() for r in warnings]


def test_without_native_kernels_the_eager_ones_answer_with_one_warning(monkeypatch, caplog):
    """A machine where no C++ compiler built the native kernels: one warning, identical results."""
    plan = ExchangePlan.build(NUMELS, 2, 4, B, chunk_numel=4 * B)
    xs = [torch.randn(plan.numel) for _ in range(2)]
    want = _run(plan, xs)
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "IMPORT_ERROR", ImportError("no module named _native"))
    monkeypatch.setattr(kernels, "_WARNED", __import__("threading").Event())
    assert kernels.backend("cpu") == "eager"
    with caplog.at_level(logging.WARNING, logger="gradcomp.codec"):
        got = _run(plan, xs)
        _run(plan, xs)
    assert all(_same_bits(a, b) for a, b in zip((want[0], *want[3], *want[4]), (got[0], *got[3], *got[4])))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "native kernels are not built" in warnings[0] and "no module named _native" in warnings[0], warnings
