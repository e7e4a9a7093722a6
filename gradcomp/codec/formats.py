"""Wire formats: what one gradient value costs on the wire, in one frozen object per format.

Every part of gradcomp that sends quantized values (the DDP hook, the hierarchical exchange, FSDP2's
collectives, the offline replay, the policy, the cost model, the CLI) asks a :class:`WireFormat` for
its code width, its scales, its message sizes and its header id; nobody checks ``bits in (2, 4, 8)``
by hand. Look one up with :func:`wire_format`, which also takes the shorthand ``bits=8``.

A message carries ``blocks`` blocks of ``block_size`` values: the packed codes, padding to a
multiple of 4 bytes, one scale per block, and a :data:`HEADER_BYTES`-byte header
(:meth:`WireFormat.message_layout`).

Worked example (``int4``, blocks of 256, a shard of 3 blocks): codes ``3 * 256 * 4 / 8 = 384``
bytes, scales at byte 384 (already 4-aligned), ``3 * 4 = 12`` bytes of fp32 scales, the header at
byte 396, 412 bytes in all: ``4/8 + 4/256 = 0.516`` bytes per value plus the header.

The registry (:data:`FORMATS`) holds today's formats:

====== ==== ====================== ======= ======================
name   bits codes                  scale   bytes per value (B=256)
====== ==== ====================== ======= ======================
int8   8    symmetric, [-127, 127] fp32    1.0156
int4   4    symmetric, [-7, 7]     fp32    0.5156
int2   2    symmetric, [-1, 1]     fp32    0.2656
====== ==== ====================== ======= ======================

Integer codes are stored with the offset ``2**(bits - 1)`` (so code ``offset`` means zero) and
packed first code lowest: two 4-bit codes per byte, four 2-bit codes per byte.

A new format is one entry here, its kernels (:mod:`gradcomp.codec.kernels`) and a CLI choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = ["HEADER_BYTES", "WireFormat", "FORMATS", "wire_format", "format_names", "gradient_bits", "format_of_header"]

HEADER_BYTES = 16  # step, bucket index, chunk << 8 | header id, bucket numel: four int32

_CODE_KINDS = ("int",)
_SCALE_KINDS = {"fp32": 4}


@dataclass(frozen=True)
class WireFormat:
    """One way of sending gradient values: code width and kind, scale layout, header id.

    Attributes:
        name: the registry name, e.g. ``"int8"``.
        bits: bits per code on the wire (8, 4 or 2).
        code: the code kind: ``"int"``, symmetric integers in ``[-qmax, qmax]`` stored with the
            offset ``2**(bits - 1)``.
        scale: the scale kind: ``"fp32"``, one fp32 scale per block (``max|x| / qmax``).
        header_id: the byte that names the format in every message header (1..255).

    Example:
        >>> f = wire_format(4)
        >>> f.name, f.qmax, hex(f.zero_byte), f.bytes_per_value(256)
        ('int4', 7, '0x88', 0.515625)
    """

    name: str
    bits: int
    code: str
    scale: str
    header_id: int

    def __post_init__(self) -> None:
        if self.code not in _CODE_KINDS:
            raise ValueError(f"code must be one of {_CODE_KINDS}, got {self.code!r}")
        if self.scale not in _SCALE_KINDS:
            raise ValueError(f"scale must be one of {tuple(_SCALE_KINDS)}, got {self.scale!r}")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be one of (2, 4, 8) (codes fill whole bytes), got {self.bits!r}")
        if not 1 <= self.header_id <= 255:
            raise ValueError(f"header_id must be in [1, 255], got {self.header_id!r}")

    # ---- codes

    @property
    def qmax(self) -> int:
        """The largest code magnitude: 127, 7 or 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def offset(self) -> int:
        """What is added to a signed code to store it unsigned (the stored code of zero)."""
        return 1 << (self.bits - 1)

    @property
    def codes_per_byte(self) -> int:
        """Codes packed into one byte: 1, 2 or 4."""
        return 8 // self.bits

    @property
    def zero_byte(self) -> int:
        """A byte whose every packed code is zero: 0x80 (int8), 0x88 (int4), 0xAA (int2)."""
        byte = 0
        for i in range(self.codes_per_byte):
            byte |= self.offset << (self.bits * i)
        return byte

    def code_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` packed codes (``numel`` a multiple of :attr:`codes_per_byte`)."""
        if numel % self.codes_per_byte:
            raise ValueError(f"{self.name} packs {self.codes_per_byte} codes per byte; {numel} codes do not fill whole bytes")
        return numel // self.codes_per_byte

    # ---- scales and messages

    @property
    def scale_bytes(self) -> int:
        """Bytes of one block's scale."""
        return _SCALE_KINDS[self.scale]

    def bytes_per_value(self, block_size: int) -> float:
        """Wire bytes per value, scales included, headers excluded: ``bits / 8 + scale_bytes / block_size``."""
        return self.bits / 8 + self.scale_bytes / block_size

    def message_layout(self, blocks: int, block_size: int) -> Tuple[int, int, int, int]:
        """Where the parts of a message of ``blocks`` blocks start: ``(code_bytes, scale_offset, header_offset, message_bytes)``.

        Codes first, padded to a multiple of 4 bytes so that the fp32 scales and the int32 header
        can be viewed in place; then one scale per block, then the header.
        """
        code_bytes = self.code_bytes(blocks * block_size)
        scale_offset = code_bytes + (-code_bytes) % 4
        header_offset = scale_offset + self.scale_bytes * blocks
        header_offset += (-header_offset) % 4
        return code_bytes, scale_offset, header_offset, header_offset + HEADER_BYTES

    def message_bytes(self, blocks: int, block_size: int) -> int:
        """Bytes of one message of ``blocks`` blocks, header included."""
        return self.message_layout(blocks, block_size)[3]

    def check_block_size(self, block_size: int, name: str = "block_size") -> int:
        """Return ``block_size`` if a block of it fills whole bytes of codes, else raise ``ValueError``.

        Example: ``wire_format("int2").check_block_size(6)`` raises (4 codes per byte).
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{name} must be a positive int, got {block_size!r}")
        if block_size % self.codes_per_byte:
            raise ValueError(
                f"{name} must be a multiple of {self.codes_per_byte} for {self.name} ({self.codes_per_byte} codes per byte), "
                f"got {block_size}"
            )
        return block_size

    # ---- naming

    @property
    def short(self) -> Union[int, str]:
        """The shortest spelling that names this format: its ``bits`` where that is the shorthand, else its name.

        Configs store a format this way (``8`` for int8, as before formats had names), so that a
        checkpoint or a comparison across ranks reads the same whichever spelling was given.

        Example: ``wire_format("int4").short == 4``.
        """
        return self.bits if _by_bits(self.bits) is self else self.name


#: The registry: every format gradcomp can send, by name. A new format is one entry here (with a
#: ``header_id`` of its own), its kernels in :mod:`gradcomp.codec.kernels`, and its CLI choice.
FORMATS: Dict[str, WireFormat] = {
    f.name: f
    for f in (
        WireFormat("int8", 8, "int", "fp32", header_id=8),
        WireFormat("int4", 4, "int", "fp32", header_id=4),
        WireFormat("int2", 2, "int", "fp32", header_id=2),
    )
}


def _by_bits(bits: int) -> Optional[WireFormat]:
    """The format the shorthand ``bits`` names: the registered ``int`` format of that width (None: none)."""
    fmt = FORMATS.get(f"int{bits}")
    return fmt if fmt is not None and fmt.code == "int" and fmt.bits == bits else None


def format_names() -> Tuple[str, ...]:
    """The registered format names, e.g. ``('int8', 'int4', 'int2')``."""
    return tuple(FORMATS)


def gradient_bits() -> Tuple[int, ...]:
    """The ``bits=`` shorthands that name a format: ``(2, 4, 8)``."""
    return tuple(sorted(f.bits for f in FORMATS.values() if _by_bits(f.bits) is f))


def wire_format(spec: Union[WireFormat, str, int], name: str = "format") -> WireFormat:
    """Return the :class:`WireFormat` that ``spec`` names.

    Args:
        spec: a :class:`WireFormat`, a registry name (``"int8"``), or the shorthand ``bits``
            (``8`` for ``"int8"``, ``4`` for ``"int4"``, ``2`` for ``"int2"``).
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
