"""Wire formats: what one gradient value costs on the wire, in one frozen object per format.

Every part of gradcomp that sends quantized values (the DDP hook, the hierarchical exchange, FSDP2's
collectives, the offline replay, the policy, the cost model, the CLI) asks a :class:`WireFormat` for
its codes, its scales, its message sizes and its header id; nobody checks ``bits in (2, 4, 8)`` by
hand. Look one up with :func:`wire_format`, which also takes the shorthand ``bits=8``.

A message carries ``blocks`` blocks of ``block_size`` values: the packed codes, padding to a
multiple of 4 bytes, the scales (one fp32 per block, or one e8m0 byte per group of 32 values),
padding to 4 bytes, and a :data:`HEADER_BYTES`-byte header (:meth:`WireFormat.message_layout`).

Worked example (``int4``, blocks of 256, a shard of 3 blocks): codes ``3 * 256 * 4 / 8 = 384``
bytes, scales at byte 384 (already 4-aligned), ``3 * 4 = 12`` bytes of fp32 scales, the header at
byte 396, 412 bytes in all: ``4/8 + 4/256 = 0.516`` bytes per value plus the header. ``mxfp4``, same
shard: 384 bytes of codes, ``3 * 8 = 24`` e8m0 bytes (8 groups of 32 per block), header at 408:
``4/8 + 1/32 = 0.531`` bytes, 4.25 bits per value.

The registry (:data:`FORMATS`), bits per value on the wire at ``B = 256``:

=========== ==== ============================== ============ =========
name        bits codes                          scales       bits/value
=========== ==== ============================== ============ =========
int8        8    integers in [-127, 127]        fp32/block   8.125
int4        4    integers in [-7, 7]            fp32/block   4.125
int2        2    integers in [-1, 1]            fp32/block   2.125
fp8_e4m3    8    OCP FP8 E4M3 (e4m3fn), +-448   fp32/block   8.125
fp8_e5m2    8    OCP FP8 E5M2, +-57344          fp32/block   8.125
mxint8      8    OCP MXINT8: integers * 2**-6   e8m0/32      8.25
mxfp8       8    OCP MXFP8 (E4M3 elements)      e8m0/32      8.25
mxfp4       4    OCP MXFP4 (E2M1 elements), +-6 e8m0/32      4.25
=========== ==== ============================== ============ =========

and each of them with a randomized Hadamard rotation per block, named with an ``r``: ``int8r``,
``int4r``, ``int2r``, ``fp8_e4m3r``, ``fp8_e5m2r``, ``mxint8r``, ``mxfp8r``, ``mxfp4r`` (same bytes,
see :attr:`WireFormat.rotate`); ``int4r`` and ``int2r`` also fit their step to the rotated block's
rms instead of its absmax (:attr:`WireFormat.rms_step`) and use all 16 or 4 codes as mid-rise levels
``(k + 1/2) * scale`` (:attr:`WireFormat.midrise`). Rotation is part of the format rather than a separate switch: it
changes what the codes mean, so a peer that rotates and one that does not must never pair their
messages, and the header id, the agreed wire config, a checkpoint's config, the policy's
candidates and the CLI all name it with no extra field.

**Scales.** ``fp32``: one scale per block, ``max|c| / max_code`` (``max_code`` 127, 7, 1, 448,
57344), or ``rms_step * rms(c)`` (``int4r``, ``int2r``). ``e8m0`` (OCP Microscaling v1.0): one power of two ``X = 2**(k - 127)`` per group of 32
values, stored as the byte ``k``; the spec's choice ``X = 2**(floor(log2(amax)) - emax_elem)``
with ``emax_elem`` the exponent of the element format's largest normal (8 for E4M3, 2 for E2M1, 0 for
MXINT8's 1.6 fixed point), i.e. ``k = E(amax) - emax_elem`` with ``E`` the biased fp32 exponent;
elements that then exceed the element format saturate (E4M3 at 448, E2M1 at 6, MXINT8 at 127/64).
A **zero** group (or one whose ``amax`` is below ``2**(emax_elem - 127)``, fp32 denormals) gets
``k = 0`` (``X = 2**-127``) and codes of zero. A group holding a **nan or an inf** gets ``k = 255``
(the spec's NaN) and zero codes, so it decodes to nan in every value (a mid-rise format with an
infinite scale: inf or nan): a non-finite gradient is never saturated into a finite one, and every
rank sees it. (fp32 scales do the same with a nan or
inf scale.) A rotated block sums its values: one whose magnitudes add up past fp32's range (values
around ``1e36`` in a block of 256) overflows and is reported non-finite the same way.

**Float codes** (E4M3, E5M2, E2M1) round to nearest with ties to even (or stochastically, on the
magnitude), saturate at the format's largest finite value and never produce a nan or inf code;
decoding follows the OCP tables (E4M3's ``0x7F``/``0xFF`` and E5M2's ``0x7C``-``0x7F`` decode to
nan/inf, as :mod:`torch`'s ``float8_e4m3fn``/``float8_e5m2`` read them). Integer codes are stored with
the offset ``2**(bits - 1)`` (code ``offset`` means zero), float codes as their sign-magnitude bit
patterns (zero is ``0x00``); both are packed first code lowest: two 4-bit codes per byte, four
2-bit codes per byte.

A new format is one entry here, its kernels (:mod:`gradcomp.codec.kernels`) and a CLI choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = [
    "HEADER_BYTES",
    "ROTATION_SEED",
    "WireFormat",
    "FORMATS",
    "wire_format",
    "format_names",
    "gradient_bits",
    "format_of_header",
]

HEADER_BYTES = 16  # step, bucket index, chunk << 8 | header id, bucket numel: four int32

#: Seed of the rotation's random signs: one fixed sign vector per block size, the same on every
#: rank, in every run and after every resume (:func:`gradcomp.codec.kernels.reference.rotation_signs`).
ROTATION_SEED = 0x5EED_4AD4

# float element formats: (bits, mantissa bits, smallest normal exponent, largest finite value)
_FLOAT_CODES = {"e4m3": (8, 3, -6, 448.0), "e5m2": (8, 2, -14, 57344.0), "e2m1": (4, 1, 0, 6.0)}
_CODE_KINDS = ("int",) + tuple(_FLOAT_CODES)
_SCALE_KINDS = {"fp32": 4, "e8m0": 1}


@dataclass(frozen=True)
class WireFormat:
    """One way of sending gradient values: code kind and width, scale layout, rotation, header id.

    Attributes:
        name: the registry name, e.g. ``"int8"``, ``"mxfp4r"``.
        bits: bits per code on the wire (8, 4 or 2).
        code: the code kind: ``"int"`` (symmetric integers in ``[-qmax, qmax]`` stored with the
            offset ``2**(bits - 1)``), or an OCP float element: ``"e4m3"`` (8 bits, +-448),
            ``"e5m2"`` (8 bits, +-57344), ``"e2m1"`` (4 bits, +-6), stored as sign-magnitude bits.
        scale: ``"fp32"``, one fp32 scale per block (``max|c| / max_code``), or ``"e8m0"``, one
            power-of-two byte per ``group`` values (OCP Microscaling).
        header_id: the byte that names the format in every message header (1..255).
        group: values per ``e8m0`` scale (32 in the MX formats); 0 with ``fp32`` scales (one per block).
        rotate: rotate every block with a randomized Hadamard transform before quantizing (signs
            from :data:`ROTATION_SEED`, the same on every rank); residuals and the owner's sum stay
            in the rotated space and decoding rotates back once. It spreads a block's outliers over
            the whole block, so the scale fits the bulk of the values.
        rms_step: 0: the scale is ``max|c| / qmax`` (nothing saturates). ``> 0`` (integer codes,
            fp32 scales, rotated): the scale is ``rms_step * rms(c)``, the step that minimizes the
            squared error of a Gaussian block (values beyond the outer levels saturate, and error
            feedback carries what they lose). A rotated block is close to Gaussian whatever the
            gradient looked like, which is what makes a fixed step right; without rotation the
            same rule costs int4 2 dB on TinyGPT's captured gradients.
        midrise: integer codes at the levels ``(k + 1/2) * scale``, ``k`` in ``[-2**(bits-1),
            2**(bits-1) - 1]``: every one of the ``2**bits`` codes is a level (the symmetric codes
            leave one unused), and no level is zero, which a rotated block, whose values are never
            exactly zero, does not miss. With the Gaussian-optimal steps (int2r 0.995, int4r 0.3355
            times the rms) a Gaussian block's SQNR is 9.25 dB at 2 bits (3 symmetric levels with
            an absmax scale: 1.9 dB; with a fitted step: 7.2) and 19.4 dB at 4 bits (absmax: 18.0).

    Example:
        >>> f = wire_format(4)
        >>> f.name, f.qmax, hex(f.zero_byte), f.bytes_per_value(256)
        ('int4', 7, '0x88', 0.515625)
        >>> wire_format("mxfp4").bytes_per_value(256) * 8
        4.25
    """

    name: str
    bits: int
    code: str
    scale: str
    header_id: int
    group: int = 0
    rotate: bool = False
    rms_step: float = 0.0
    midrise: bool = False

    def __post_init__(self) -> None:
        if self.code not in _CODE_KINDS:
            raise ValueError(f"code must be one of {_CODE_KINDS}, got {self.code!r}")
        if self.scale not in _SCALE_KINDS:
            raise ValueError(f"scale must be one of {tuple(_SCALE_KINDS)}, got {self.scale!r}")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be one of (2, 4, 8) (codes fill whole bytes), got {self.bits!r}")
        if self.code in _FLOAT_CODES and _FLOAT_CODES[self.code][0] != self.bits:
            raise ValueError(f"{self.code} codes have {_FLOAT_CODES[self.code][0]} bits, got bits={self.bits!r}")
        if not 1 <= self.header_id <= 255:
            raise ValueError(f"header_id must be in [1, 255], got {self.header_id!r}")
        if self.scale == "e8m0" and (isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 16 or self.group % 16):
            raise ValueError(f"group must be a positive multiple of 16 with e8m0 scales (32 in the MX formats), got {self.group!r}")
        if self.scale == "fp32" and self.group != 0:
            raise ValueError(f"group must be 0 with fp32 scales (one scale per block), got {self.group!r}")
        if not isinstance(self.rotate, bool):
            raise TypeError(f"rotate must be a bool, got {type(self.rotate).__name__} {self.rotate!r}")
        if isinstance(self.rms_step, bool) or not isinstance(self.rms_step, (int, float)) or not 0 <= self.rms_step < 16:
            raise ValueError(f"rms_step must be a number in [0, 16), got {self.rms_step!r}")
        if self.rms_step and (self.is_float or self.scale != "fp32" or not self.rotate):
            raise ValueError(f"rms_step applies to rotated integer codes with fp32 scales, got {self.code} codes, {self.scale} scales, rotate={self.rotate}")
        if not isinstance(self.midrise, bool):
            raise TypeError(f"midrise must be a bool, got {type(self.midrise).__name__} {self.midrise!r}")
        if self.midrise and not self.rms_step:
            raise ValueError("midrise levels need a fitted step (rms_step > 0, rotated integer codes): no level is zero")

    # ---- codes

    @property
    def is_float(self) -> bool:
        """Whether the codes are float elements (E4M3, E5M2, E2M1) rather than integers."""
        return self.code in _FLOAT_CODES

    @property
    def qmax(self) -> int:
        """The largest integer code magnitude: 127, 7 or 1 (integer codes only; mid-rise levels reach ``qmax + 1/2``)."""
        if self.is_float:
            raise ValueError(f"{self.name} has {self.code} float codes, not integers: use max_code ({self.max_code})")
        return (1 << (self.bits - 1)) - 1

    @property
    def max_code(self) -> float:
        """The largest element magnitude as a number: ``qmax`` (127, 7, 1), ``qmax + 1/2`` (mid-rise), or the float's largest finite value (448, 57344, 6)."""
        if self.is_float:
            return _FLOAT_CODES[self.code][3]
        return self.qmax + 0.5 if self.midrise else float(self.qmax)

    @property
    def mantissa_bits(self) -> int:
        """Mantissa bits of a float element (3 for E4M3, 2 for E5M2, 1 for E2M1)."""
        return _FLOAT_CODES[self.code][1]

    @property
    def min_exponent(self) -> int:
        """Exponent of a float element's smallest normal (-6 for E4M3, -14 for E5M2, 0 for E2M1)."""
        return _FLOAT_CODES[self.code][2]

    @property
    def offset(self) -> int:
        """What is added to a signed integer code to store it unsigned (the stored code of zero); 0 for float codes."""
        return 0 if self.is_float else 1 << (self.bits - 1)

    @property
    def codes_per_byte(self) -> int:
        """Codes packed into one byte: 1, 2 or 4."""
        return 8 // self.bits

    @property
    def zero_byte(self) -> int:
        """A byte whose every packed code is zero: 0x80 (int8), 0x88 (int4), 0xAA (int2), 0x00 (float codes)."""
        byte = 0
        for i in range(self.codes_per_byte):
            byte |= self.offset << (self.bits * i)
        return byte

    def code_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` packed codes (``numel`` a multiple of :attr:`codes_per_byte`)."""
        if numel % self.codes_per_byte:
            raise ValueError(f"{self.name} packs {self.codes_per_byte} codes per byte; {numel} codes do not fill whole bytes")
        return numel // self.codes_per_byte

    # ---- scales

    @property
    def emax_elem(self) -> int:
        """``floor(log2)`` of the element format's largest normal: the shared exponent's offset (OCP MX).

        8 for E4M3 (448), 15 for E5M2, 2 for E2M1 (6), 0 for MXINT8 (127/64).
        """
        return math.floor(math.log2(self.max_code)) if self.is_float else 0

    @property
    def frac_bits(self) -> int:
        """Fraction bits of an MX integer element (``bits - 2``: MXINT8 is 1.6 fixed point); 0 otherwise."""
        return self.bits - 2 if self.scale == "e8m0" and not self.is_float else 0

    @property
    def scale_bytes(self) -> int:
        """Bytes of one scale: 4 (fp32) or 1 (e8m0)."""
        return _SCALE_KINDS[self.scale]

    @property
    def scale_dtype(self) -> str:
        """The torch dtype name scales are viewed as: ``"float32"`` or ``"uint8"``."""
        return "float32" if self.scale == "fp32" else "uint8"

    def scales_per_block(self, block_size: int) -> int:
        """Scales of one block: 1 (fp32) or ``block_size / group`` (e8m0)."""
        return block_size // self.group if self.group else 1

    def scale_bytes_per_block(self, block_size: int) -> int:
        """Scale bytes of one block: 4 (fp32), ``block_size / 32`` (e8m0 groups of 32)."""
        return self.scale_bytes * self.scales_per_block(block_size)

    def bytes_per_value(self, block_size: int) -> float:
        """Wire bytes per value, scales included, headers excluded: ``bits / 8 + scale bytes / block_size``."""
        return self.bits / 8 + self.scale_bytes_per_block(block_size) / block_size

    # ---- messages

    def message_layout(self, blocks: int, block_size: int) -> Tuple[int, int, int, int]:
        """Where the parts of a message of ``blocks`` blocks start: ``(code_bytes, scale_offset, header_offset, message_bytes)``.

        Codes first, padded to a multiple of 4 bytes so that the fp32 scales and the int32 header
        can be viewed in place; then the scales of every block, padded to 4 bytes, then the header.
        """
        code_bytes = self.code_bytes(blocks * block_size)
        scale_offset = code_bytes + (-code_bytes) % 4
        header_offset = scale_offset + self.scale_bytes_per_block(block_size) * blocks
        header_offset += (-header_offset) % 4
        return code_bytes, scale_offset, header_offset, header_offset + HEADER_BYTES

    def message_bytes(self, blocks: int, block_size: int) -> int:
        """Bytes of one message of ``blocks`` blocks, header included."""
        return self.message_layout(blocks, block_size)[3]

    def check_block_size(self, block_size: int, name: str = "block_size") -> int:
        """Return ``block_size`` if this format can cut it, else raise ``ValueError``.

        A block must fill whole bytes of codes, hold whole scale groups (e8m0: a multiple of
        ``group``) and, rotated, be a power of two (the Hadamard transform's size).

        Example: ``wire_format("int2").check_block_size(6)`` raises (4 codes per byte);
        ``wire_format("mxfp4").check_block_size(48)`` raises (groups of 32).
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{name} must be a positive int, got {block_size!r}")
        if block_size % self.codes_per_byte:
            raise ValueError(
                f"{name} must be a multiple of {self.codes_per_byte} for {self.name} ({self.codes_per_byte} codes per byte), "
                f"got {block_size}"
            )
        if self.group and block_size % self.group:
            raise ValueError(f"{name} must be a multiple of {self.group} for {self.name} (one e8m0 scale per {self.group} values), got {block_size}")
        if self.rotate and (block_size < 16 or block_size & (block_size - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 for {self.name} (its Hadamard rotation spans a block), got {block_size}")
        return block_size

    # ---- naming

    @property
    def short(self) -> Union[int, str]:
        """The shortest spelling that names this format: its ``bits`` where that is the shorthand, else its name.

        Configs store a format this way (``8`` for int8, as before formats had names), so that a
        checkpoint or a comparison across ranks reads the same whichever spelling was given.

        Example: ``wire_format("int4").short == 4``; ``wire_format("mxfp4").short == "mxfp4"``.
        """
        return self.bits if _by_bits(self.bits) is self else self.name

    @property
    def base(self) -> "WireFormat":
        """The same format without rotation (itself when it does not rotate)."""
        return FORMATS.get(self.name[:-1], self) if self.rotate else self

    @property
    def rotated(self) -> Optional["WireFormat"]:
        """The registered rotated variant of this format (itself when it rotates; None when none is registered)."""
        return self if self.rotate else FORMATS.get(self.name + "r")

    def describe(self) -> str:
        """One line for tables and logs, e.g. ``"mxfp4r: e2m1 codes, e8m0 scale per 32 values, rotated"``."""
        scale = "fp32 scale per block" if self.scale == "fp32" else f"e8m0 scale per {self.group} values"
        if self.rms_step:
            scale += f" ({self.rms_step} x rms{', mid-rise levels' if self.midrise else ''})"
        return f"{self.name}: {self.bits}-bit {self.code} codes, {scale}{', rotated' if self.rotate else ''}"


def _registry() -> Dict[str, WireFormat]:
    base = (
        WireFormat("int8", 8, "int", "fp32", header_id=8),
        WireFormat("int4", 4, "int", "fp32", header_id=4),
        WireFormat("int2", 2, "int", "fp32", header_id=2),
        WireFormat("fp8_e4m3", 8, "e4m3", "fp32", header_id=16),
        WireFormat("fp8_e5m2", 8, "e5m2", "fp32", header_id=17),
        WireFormat("mxint8", 8, "int", "e8m0", header_id=32, group=32),
        WireFormat("mxfp8", 8, "e4m3", "e8m0", header_id=33, group=32),
        WireFormat("mxfp4", 4, "e2m1", "e8m0", header_id=34, group=32),
    )
    steps = {"int4": 0.3355, "int2": 0.995}  # the Gaussian MSE-optimal steps of 16 and 4 mid-rise levels, in units of rms
    rotated = tuple(
        dataclasses.replace(f, name=f.name + "r", header_id=f.header_id | 0x80, rotate=True, rms_step=steps.get(f.name, 0.0),
                            midrise=f.name in steps)
        for f in base
    )
    return {f.name: f for f in base + rotated}


#: The registry: every format gradcomp can send, by name. A new format is one entry here (with a
#: ``header_id`` of its own), its kernels in :mod:`gradcomp.codec.kernels`, and its CLI choice.
FORMATS: Dict[str, WireFormat] = _registry()


def _by_bits(bits: int) -> Optional[WireFormat]:
    """The format the shorthand ``bits`` names: the registered ``int`` format of that width (None: none)."""
    fmt = FORMATS.get(f"int{bits}")
    return fmt if fmt is not None and fmt.code == "int" and fmt.bits == bits and not fmt.rotate else None


def format_names() -> Tuple[str, ...]:
    """The registered format names, e.g. ``('int8', 'int4', 'int2', 'fp8_e4m3', ...)``."""
    return tuple(FORMATS)


def gradient_bits() -> Tuple[int, ...]:
    """The ``bits=`` shorthands that name a format: ``(2, 4, 8)``."""
    return tuple(sorted(f.bits for f in FORMATS.values() if _by_bits(f.bits) is f))


def wire_format(spec: Union[WireFormat, str, int], name: str = "format") -> WireFormat:
    """Return the :class:`WireFormat` that ``spec`` names.

    Args:
        spec: a :class:`WireFormat`, a registry name (``"int8"``, ``"mxfp4r"``), or the shorthand
            ``bits`` (``8`` for ``"int8"``, ``4`` for ``"int4"``, ``2`` for ``"int2"``).
        name: the argument's name, for the error message.

    Raises:
        TypeError: ``spec`` is none of those types (a bool, a float).
        ValueError: ``spec`` names no registered format.

    Example:
        >>> wire_format(8) is wire_format("int8")
        True
    """
    if isinstance(spec, WireFormat):
        return spec
    if isinstance(spec, str):
        fmt = FORMATS.get(spec)
        if fmt is None:
            raise ValueError(f"{name} must be one of {format_names()}, got {spec!r}")
        return fmt
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise TypeError(
            f"{name} must be an int, one of {gradient_bits()}, or a format name {format_names()}, got {type(spec).__name__} {spec!r}"
        )
    fmt = _by_bits(spec)
    if fmt is None:
        raise ValueError(f"{name} must be one of {gradient_bits()}, got {spec} (or name a format: {format_names()})")
    return fmt


def format_of_header(header_id: int) -> Optional[WireFormat]:
    """The format whose header id is ``header_id``, or None (a corrupt or foreign message)."""
    return next((f for f in FORMATS.values() if f.header_id == header_id), None)
