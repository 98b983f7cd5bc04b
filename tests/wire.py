"""Protobuf wire-format pieces for tests that build frames by hand (bombs, odd shapes)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """``value`` as a protobuf base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
