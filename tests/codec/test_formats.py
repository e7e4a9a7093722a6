"""The wire-format registry: lookups, the shorthand, sizes, headers, and the errors of a bad spec."""

from __future__ import annotations

import pytest

from gradcomp.codec.formats import (
    FORMATS,
    HEADER_BYTES,
    WireFormat,
    format_names,
    format_of_header,
    gradient_bits,
    wire_format,
)


def test_registry_holds_the_int_formats_with_distinct_header_ids():
    assert format_names() == ("int8", "int4", "int2")
    assert gradient_bits() == (2, 4, 8)
    ids = [f.header_id for f in FORMATS.values()]
    assert len(set(ids)) == len(ids)
    for f in FORMATS.values():
        assert format_of_header(f.header_id) is f
    assert format_of_header(0) is None and format_of_header(200) is None


def test_bits_are_shorthand_for_the_int_format_and_configs_keep_the_short_spelling():
    for bits in (8, 4, 2):
        fmt = wire_format(bits)
        assert fmt is wire_format(f"int{bits}") is wire_format(fmt)
        assert fmt.short == bits and fmt.bits == bits and fmt.code == "int"


def test_the_hook_config_asks_the_registry():
    import gradcomp

    assert not hasattr(__import__("gradcomp.checks").checks, "GRADIENT_BITS")  # no width list kept by hand
    for name in ("int8", "int4", "int2"):
        cfg = gradcomp.HookConfig(format=name)
        assert cfg.wire is wire_format(name) and cfg.bits == wire_format(name).bits and cfg.format == name
    assert gradcomp.HookConfig(bits=4).format == "int4" and gradient_bits() == (2, 4, 8)


def test_codes_scales_and_messages_follow_the_docstring_example():
    f = wire_format("int4")
    assert (f.qmax, f.offset, f.codes_per_byte, f.zero_byte) == (7, 8, 2, 0x88)
    assert wire_format(8).zero_byte == 0x80 and wire_format(2).zero_byte == 0xAA
    # int4, blocks of 256, a shard of 3 blocks: codes 384 bytes, scales at 384, header at 396, 412 in all
    assert f.message_layout(3, 256) == (384, 384, 396, 396 + HEADER_BYTES) and f.message_bytes(3, 256) == 412
    assert f.bytes_per_value(256) == pytest.approx(0.515625)
    # 2-bit codes of one 8-value block: 2 bytes, padded to 4 before the fp32 scale
    assert wire_format(2).message_layout(1, 8) == (2, 4, 8, 8 + HEADER_BYTES)
    assert f.check_block_size(6) == 6
    with pytest.raises(ValueError, match=r"block_size must be a multiple of 4 for int2 \(4 codes per byte\), got 6"):
        wire_format(2).check_block_size(6)
    with pytest.raises(ValueError, match="int4 packs 2 codes per byte; 3 codes"):
        f.code_bytes(3)


@pytest.mark.parametrize("spec,exc,match", [
    (3, ValueError, r"format must be one of \(2, 4, 8\), got 3 \(or name a format: \('int8', 'int4', 'int2'\)\)"),
    ("fp8", ValueError, r"format must be one of \('int8', 'int4', 'int2'\), got 'fp8'"),
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
        WireFormat("x", 8, "int", "e8m0", 9)
    with pytest.raises(ValueError, match="bits must be one of"):
        WireFormat("x", 3, "int", "fp32", 9)
    with pytest.raises(ValueError, match=r"header_id must be in \[1, 255\]"):
        WireFormat("x", 8, "int", "fp32", 0)
