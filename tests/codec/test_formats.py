"""The wire-format registry: lookups, the shorthand, sizes, headers, and the errors of a bad spec."""

from __future__ import annotations

import pytest
import torch

from gradcomp.codec.formats import (
    FORMATS,
    HEADER_BYTES,
    WireFormat,
    format_names,
    format_of_header,
    gradient_bits,
    wire_format,
)
from gradcomp.codec.kernels import reference as ref

BASE = ("int8", "int4", "int2", "fp8_e4m3", "fp8_e5m2", "mxint8", "mxfp8", "mxfp4")


def test_registry_holds_every_format_and_its_rotation_with_distinct_header_ids():
    assert format_names() == BASE + tuple(f"{n}r" for n in BASE)
    assert gradient_bits() == (2, 4, 8)
    ids = [f.header_id for f in FORMATS.values()]
    assert len(set(ids)) == len(ids)
    for f in FORMATS.values():
        assert format_of_header(f.header_id) is f
        assert f.rotate == f.name.endswith("r") and f.base.name == f.name.rstrip("r") and f.base.rotated is f.rotated
    assert format_of_header(0) is None and format_of_header(200) is None
    assert wire_format("int4r").base is wire_format(4) and wire_format(4).rotated is wire_format("int4r")


def test_bits_are_shorthand_for_the_int_format_and_configs_keep_the_short_spelling():
    for bits in (8, 4, 2):
        fmt = wire_format(bits)
        assert fmt is wire_format(f"int{bits}") is wire_format(fmt)
        assert fmt.short == bits and fmt.bits == bits and fmt.code == "int"
    assert wire_format("int4r").short == "int4r" and wire_format("mxfp4").short == "mxfp4"


def test_the_hook_config_asks_the_registry():
    import gradcomp

    assert not hasattr(__import__("gradcomp.checks").checks, "GRADIENT_BITS")  # no width list kept by hand
    for name in format_names():
        cfg = gradcomp.HookConfig(format=name)
        assert cfg.wire is wire_format(name) and cfg.bits == wire_format(name).bits and cfg.format == name
    assert gradcomp.HookConfig(bits=4).format == "int4" and gradient_bits() == (2, 4, 8)
    with pytest.raises(ValueError, match=r"block_size must be a multiple of 32 for mxfp4 \(one e8m0 scale per 32 values\), got 48"):
        gradcomp.HookConfig(format="mxfp4", block_size=48)
    with pytest.raises(ValueError, match=r"block_size must be a power of two >= 16 for int2r .*got 96"):
        gradcomp.HookConfig(format="int2r", block_size=96)


@pytest.mark.parametrize("name,bits_per_value", [
    ("int8", 8.125), ("int4", 4.125), ("int2", 2.125), ("fp8_e4m3", 8.125), ("fp8_e5m2", 8.125),
    ("mxint8", 8.25), ("mxfp8", 8.25), ("mxfp4", 4.25), ("int2r", 2.125), ("mxfp4r", 4.25),
])
def test_bits_per_value_on_the_wire(name, bits_per_value):
    """fp32 scales: bits + 32/256; e8m0 scales: bits + 8/32, whatever the block (the issue's 8.25 and 4.25)."""
    f = wire_format(name)
    assert f.bytes_per_value(256) * 8 == bits_per_value
    if f.scale == "e8m0":
        assert f.bytes_per_value(64) * 8 == bits_per_value and f.scales_per_block(256) == 8 and f.scale_dtype == "uint8"


def test_codes_scales_and_messages_follow_the_docstring_example():
    f = wire_format("int4")
    assert (f.qmax, f.offset, f.codes_per_byte, f.zero_byte) == (7, 8, 2, 0x88)
    assert wire_format(8).zero_byte == 0x80 and wire_format(2).zero_byte == 0xAA
    assert wire_format("fp8_e4m3").zero_byte == 0 and wire_format("mxfp4").zero_byte == 0 and wire_format("mxint8").zero_byte == 0x80
    # int4, blocks of 256, a shard of 3 blocks: codes 384 bytes, scales at 384, header at 396, 412 in all
    assert f.message_layout(3, 256) == (384, 384, 396, 396 + HEADER_BYTES) and f.message_bytes(3, 256) == 412
    assert f.bytes_per_value(256) == pytest.approx(0.515625)
    # mxfp4, same shard: 384 bytes of codes, 24 e8m0 bytes, the header at 408
    assert wire_format("mxfp4").message_layout(3, 256) == (384, 384, 408, 408 + HEADER_BYTES)
    # e8m0 bytes are padded to 4 before the header: one 32-value block of mxfp8 has 1 scale byte
    assert wire_format("mxfp8").message_layout(1, 32) == (32, 32, 36, 36 + HEADER_BYTES)
    # 2-bit codes of one 8-value block: 2 bytes, padded to 4 before the fp32 scale
    assert wire_format(2).message_layout(1, 8) == (2, 4, 8, 8 + HEADER_BYTES)
    assert f.check_block_size(6) == 6
    with pytest.raises(ValueError, match=r"block_size must be a multiple of 4 for int2 \(4 codes per byte\), got 6"):
        wire_format(2).check_block_size(6)
    with pytest.raises(ValueError, match="int4 packs 2 codes per byte; 3 codes"):
        f.code_bytes(3)


def test_element_constants_follow_the_ocp_formats():
    e4m3, e5m2, e2m1 = wire_format("fp8_e4m3"), wire_format("fp8_e5m2"), wire_format("mxfp4")
    assert (e4m3.max_code, e4m3.mantissa_bits, e4m3.min_exponent, e4m3.emax_elem) == (448.0, 3, -6, 8)
    assert (e5m2.max_code, e5m2.mantissa_bits, e5m2.min_exponent, e5m2.emax_elem) == (57344.0, 2, -14, 15)
    assert (e2m1.max_code, e2m1.mantissa_bits, e2m1.min_exponent, e2m1.emax_elem) == (6.0, 1, 0, 2)
    mx = wire_format("mxint8")
    assert (mx.emax_elem, mx.frac_bits, mx.qmax) == (0, 6, 127)  # MXINT8: 1.6 fixed point, max 127/64
    with pytest.raises(ValueError, match="float codes, not integers: use max_code"):
        e4m3.qmax
    # what each code stands for: torch's own float8 dtypes, and the OCP E2M1 table
    for f, dtype in ((e4m3, torch.float8_e4m3fn), (e5m2, torch.float8_e5m2)):
        want = torch.arange(256).to(torch.uint8).view(dtype).float()
        got = ref.element_values(f)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    e2m1_table = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert ref.element_values(e2m1).tolist() == e2m1_table + [-v for v in e2m1_table]


@pytest.mark.parametrize("spec,exc,match", [
    (3, ValueError, r"format must be one of \(2, 4, 8\), got 3 \(or name a format: \('int8', 'int4', 'int2', 'fp8_e4m3'"),
    ("fp8", ValueError, r"format must be one of \('int8', 'int4', 'int2', 'fp8_e4m3', .*\), got 'fp8'"),
    (8.0, TypeError, "format must be an int, one of \\(2, 4, 8\\), or a format name"),
    (True, TypeError, "got bool True"),
])
def test_bad_specs_say_what_was_expected(spec, exc, match):
    with pytest.raises(exc, match=match):
        wire_format(spec)


def test_a_format_validates_its_fields():
    with pytest.raises(ValueError, match="code must be one of"):
        WireFormat("x", 8, "float", "fp32", 9)
    with pytest.raises(ValueError, match="scale must be one of"):
        WireFormat("x", 8, "int", "fp16", 9)
    with pytest.raises(ValueError, match=r"group must be a positive multiple of 16 with e8m0 scales .*got 0"):
        WireFormat("x", 8, "int", "e8m0", 9)
    with pytest.raises(ValueError, match=r"group must be 0 with fp32 scales .*got 32"):
        WireFormat("x", 8, "int", "fp32", 9, group=32)
    with pytest.raises(ValueError, match="bits must be one of"):
        WireFormat("x", 3, "int", "fp32", 9)
    with pytest.raises(ValueError, match=r"e2m1 codes have 4 bits, got bits=8"):
        WireFormat("x", 8, "e2m1", "e8m0", 9, group=32)
    with pytest.raises(ValueError, match=r"header_id must be in \[1, 255\]"):
        WireFormat("x", 8, "int", "fp32", 0)
    with pytest.raises(TypeError, match="rotate must be a bool, got int 1"):
        WireFormat("x", 8, "int", "fp32", 9, rotate=1)
    with pytest.raises(ValueError, match="rms_step applies to rotated integer codes with fp32 scales"):
        WireFormat("x", 4, "int", "fp32", 9, rms_step=0.35)
    with pytest.raises(ValueError, match=r"rms_step must be a number in \[0, 16\), got -1"):
        WireFormat("x", 4, "int", "fp32", 9, rotate=True, rms_step=-1)
    assert wire_format("int4r").rms_step == 0.3355 and wire_format("int2r").rms_step == 0.995 and wire_format("int8r").rms_step == 0
    assert wire_format("int4r").midrise and wire_format("int4r").max_code == 7.5 and not wire_format("int8r").midrise
    with pytest.raises(ValueError, match="midrise levels need a fitted step"):
        WireFormat("x", 4, "int", "fp32", 9, rotate=True, midrise=True)
