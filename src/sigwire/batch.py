"""Batch signatures: one Ed25519 signature over a Merkle tree of signing inputs.

No I/O. A writer with several messages to send signs them all at once: each
message's signing input becomes a leaf, the leaves form a Merkle tree (the
shape of RFC 9162, section 2.1), and one Ed25519 signature covers the tree's
root, its size and the signer. Each message then carries that signature plus
its own inclusion proof (leaf index, tree size, sibling hashes), so it stays
verifiable on its own, forwarded or stored apart from its batch. A receiver
holding several messages of one batch verifies the Ed25519 signature once.

Leaves and interior nodes are hashed with different prefixes (0x00 and 0x01),
so a leaf can never pass for a node. ``docs/signing.md`` (section 4.5) is the
specification.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from typing import Final

__all__ = [
    "BATCH_DOMAIN",
    "MAX_BATCH_SIZE",
    "BatchProof",
    "BatchProofError",
    "batch_signing_input",
    "leaf_hash",
    "merkle_tree",
    "root_from_proof",
]

BATCH_DOMAIN: Final = "sigwire/v1/batch"
# No writer batches more than a frame's worth; a proof is at most 16 hashes.
MAX_BATCH_SIZE: Final = 65536
MAX_PATH_LENGTH: Final = 16

_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")


class BatchProofError(ValueError):
    """An inclusion proof that is malformed or inconsistent with its tree size."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchProof:
    """Where one message sits in the batch whose root the signature covers.

    Attributes:
        index: The message's leaf position, from 0.
        size: How many messages the batch holds.
        path: Sibling hashes (32 bytes each) from the leaf up to the root.
    """

    index: int
    size: int
    path: tuple[bytes, ...]


def leaf_hash(signing_input: bytes) -> bytes:
    """The Merkle leaf of one message: SHA-256(0x00 || signing input)."""
    return hashlib.sha256(_LEAF + signing_input).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def merkle_tree(leaves: Sequence[bytes]) -> tuple[bytes, list[tuple[bytes, ...]]]:
    """The root of ``leaves`` and each leaf's inclusion path, leaf to root.

    Raises:
        BatchProofError: No leaves, or more than :data:`MAX_BATCH_SIZE`.
    """
    if not 0 < len(leaves) <= MAX_BATCH_SIZE:
        raise BatchProofError(f"a batch holds 1..{MAX_BATCH_SIZE} messages, not {len(leaves)}")
    paths: list[list[bytes]] = [[] for _ in leaves]
    root = _build(leaves, paths, 0, len(leaves))
    return root, [tuple(path) for path in paths]


def _build(leaves: Sequence[bytes], paths: list[list[bytes]], lo: int, hi: int) -> bytes:
    # A module function, not a closure: a recursive closure is a reference
    # cycle that keeps every frame's paths alive until the garbage collector
    # runs, and makes it run more often.
    if hi - lo == 1:
        return leaves[lo]
    # The left subtree holds the largest power of two below the count.
    split = lo + (1 << ((hi - lo - 1).bit_length() - 1))
    left = _build(leaves, paths, lo, split)
    right = _build(leaves, paths, split, hi)
    for i in range(lo, split):
        paths[i].append(right)
    for i in range(split, hi):
        paths[i].append(left)
    return _node(left, right)


def root_from_proof(leaf: bytes, proof: BatchProof) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` (RFC 9162, section 2.1.3.2).

    Raises:
        BatchProofError: The index is outside the tree, a hash is not 32
            bytes, or the path is longer or shorter than the tree requires.
    """
    index, size, path = proof.index, proof.size, proof.path
    if not 0 < size <= MAX_BATCH_SIZE:
        raise BatchProofError(f"batch size must be 1..{MAX_BATCH_SIZE}, not {size}")
    if not 0 <= index < size:
        raise BatchProofError(f"leaf index {index} is outside a batch of {size}")
    if len(path) > MAX_PATH_LENGTH:
        raise BatchProofError("the inclusion path is too long")
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if len(sibling) != 32:
            raise BatchProofError("an inclusion path hash is not 32 bytes")
        if sn == 0:
            raise BatchProofError("the inclusion path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            node = _node(sibling, node)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            node = _node(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise BatchProofError("the inclusion path is shorter than the tree is deep")
    return node


def batch_signing_input(size: int, root: bytes, algorithm: str, signer: str) -> bytes:
    """What a batch signature signs: domain, tree size, root, algorithm, signer.

    ``str(BATCH_DOMAIN) || u64(size) || bytes(root) || str(algorithm) || str(signer)``
    with the primitives of ``docs/signing.md`` section 3.
    """
    return b"".join(
        (
            _str(BATCH_DOMAIN),
            _U64.pack(size),
            _U32.pack(len(root)),
            root,
            _str(algorithm),
            _str(signer),
        )
    )


def _str(text: str) -> bytes:
    raw = text.encode()
    return _U32.pack(len(raw)) + raw
