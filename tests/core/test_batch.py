"""The Merkle tree of batch signatures (docs/signing.md 4.5), against an independent RFC 9162 model.

The model below is written from RFC 9162 section 2.1 (MTH and PATH, both
recursive) and shares no code with :mod:`sigwire.batch`.
"""

from __future__ import annotations

import gc
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigwire import batch
from sigwire.batch import (
    BATCH_DOMAIN,
    MAX_BATCH_SIZE,
    MAX_PATH_LENGTH,
    BatchProof,
    BatchProofError,
    batch_signing_input,
    leaf_hash,
    merkle_tree,
    root_from_proof,
)


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 MTH over already hashed leaves, recursively."""
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(naive_mth(leaves[:k]), naive_mth(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 PATH(m, D[n]), leaf to root."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_mth(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_mth(leaves[:k])]


def _leaves(n: int, tag: bytes = b"m") -> list[bytes]:
    return [leaf_hash(tag + b"%d" % i) for i in range(n)]


def _outcome(leaf: bytes, proof: BatchProof) -> bytes | None:
    """The root ``proof`` leads to, or None when it is refused."""
    try:
        return root_from_proof(leaf, proof)
    except BatchProofError:
        return None


SIZES = range(1, 71)


# --- the tree ------------------------------------------------------------------------


def test_leaf_hash_prefixes_a_zero_byte() -> None:
    """leaf(m) = SHA-256(0x00 || signing input)."""
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()


@pytest.mark.parametrize("n", SIZES)
def test_tree_matches_naive_rfc9162_model(n: int) -> None:
    """Root and every inclusion path equal the recursive RFC 9162 MTH and PATH."""
    leaves = _leaves(n)
    root, paths = merkle_tree(leaves)
    assert root == naive_mth(leaves)
    assert len(paths) == n
    for i, path in enumerate(paths):
        assert list(path) == naive_path(i, leaves), f"path of leaf {i} of {n}"
        assert all(len(h) == 32 for h in path)


@pytest.mark.parametrize("n", SIZES)
def test_every_proof_leads_to_the_root(n: int) -> None:
    """Each leaf with its own index, size and path rebuilds exactly the root."""
    leaves = _leaves(n)
    root, paths = merkle_tree(leaves)
    for i, path in enumerate(paths):
        assert root_from_proof(leaves[i], BatchProof(i, n, path)) == root


# Roots of RFC 6962's reference test (certificate-transparency merkle_tree_test):
# the first 1..8 of these inputs, each hashed as a leaf.
CT_INPUTS = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]
CT_INPUTS.append("606162636465666768696a6b6c6d6e6f")
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("n", range(1, 9))
def test_roots_match_the_rfc6962_reference_vectors(n: int) -> None:
    """The tree shape and hashing are RFC 6962/9162's: the published reference roots."""
    leaves = [leaf_hash(bytes.fromhex(x)) for x in CT_INPUTS[:n]]
    assert merkle_tree(leaves)[0].hex() == CT_ROOTS[n - 1]


def test_one_leaf_is_its_own_root_with_an_empty_path() -> None:
    """A batch of one: root = leaf, path empty."""
    [leaf] = _leaves(1)
    assert merkle_tree([leaf]) == (leaf, [()])
    assert root_from_proof(leaf, BatchProof(0, 1, ())) == leaf


@pytest.mark.parametrize("count", [0, MAX_BATCH_SIZE + 1])
def test_tree_size_outside_the_limits_is_refused(count: int) -> None:
    """merkle_tree refuses no leaves and more than MAX_BATCH_SIZE."""
    with pytest.raises(BatchProofError):
        merkle_tree([b"\x00" * 32] * count)


def test_a_leaf_can_never_pass_for_a_node() -> None:
    """Leaves and nodes hash with different prefixes: a two-leaf root is no leaf hash."""
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    root = merkle_tree([a, b])[0]
    assert root == _node(a, b)
    assert root != leaf_hash(a + b)
    assert root != hashlib.sha256(a + b).digest()


def test_batch_signing_input_layout() -> None:
    """str(domain) || u64(size) || bytes(root) || str(algorithm) || str(signer)."""
    root = bytes(range(32))
    did = "did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"
    expected = (
        struct.pack(">I", 16)
        + b"sigwire/v1/batch"
        + struct.pack(">Q", 3)
        + struct.pack(">I", 32)
        + root
        + struct.pack(">I", 7)
        + b"Ed25519"
        + struct.pack(">I", len(did))
        + did.encode()
    )
    assert BATCH_DOMAIN == "sigwire/v1/batch"
    assert batch_signing_input(3, root, "Ed25519", did) == expected
    # Every signed part changes the bytes.
    others = {
        batch_signing_input(4, root, "Ed25519", did),
        batch_signing_input(3, bytes(32), "Ed25519", did),
        batch_signing_input(3, root, "ed25519", did),
        batch_signing_input(3, root, "Ed25519", did[:-1] + "W"),
    }
    assert expected not in others
    assert len(others) == 4


# --- mutated proofs ------------------------------------------------------------------


def _mutations(index: int, size: int, paths: list[tuple[bytes, ...]]) -> dict[str, BatchProof]:
    """Every proof mutation of the brief, for the leaf at ``index``."""
    path = paths[index]
    out: dict[str, BatchProof] = {}
    for other in {0, index - 1, index + 1, size - 1}:
        if 0 <= other < size and other != index:
            out[f"index->{other}"] = BatchProof(other, size, path)
    if path:
        out["path-shortened"] = BatchProof(index, size, path[:-1])
        out["path-first-dropped"] = BatchProof(index, size, path[1:])
        out["hash-31-bytes"] = BatchProof(index, size, (path[0][:31], *path[1:]))
        out["hash-33-bytes"] = BatchProof(index, size, (path[0] + b"\x00", *path[1:]))
        out["hash-flipped"] = BatchProof(
            index, size, (bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:])
        )
    out["path-lengthened"] = BatchProof(index, size, (*path, b"\x07" * 32))
    out["path-prepended"] = BatchProof(index, size, (b"\x07" * 32, *path))
    out["empty-hash"] = BatchProof(index, size, (*path, b""))
    for other in {0, index - 1, index + 1, size - 1}:
        if 0 <= other < size and paths[other] != path:
            out[f"path-of-{other}"] = BatchProof(index, size, paths[other])
    if len(path) >= 2:
        out["path-reversed"] = BatchProof(index, size, tuple(reversed(path)))
    out["index=size"] = BatchProof(size, size, path)
    out["index=size+1"] = BatchProof(size + 1, size, path)
    out["index-negative"] = BatchProof(-1, size, path)
    out["size-0"] = BatchProof(index, 0, path)
    out["size-max+1"] = BatchProof(index, MAX_BATCH_SIZE + 1, path)
    out["path-max+1"] = BatchProof(index, size, (*path, *([b"\x07" * 32] * MAX_PATH_LENGTH)))
    return out


@pytest.mark.parametrize("n", SIZES)
def test_every_proof_mutation_is_refused_or_leads_elsewhere(n: int) -> None:
    """Changed index, path, hash length, a sibling's path, out-of-range values: never the root."""
    leaves = _leaves(n)
    root, paths = merkle_tree(leaves)
    for i in range(n):
        for name, proof in _mutations(i, n, paths).items():
            result = _outcome(leaves[i], proof)
            assert result != root, f"leaf {i} of {n}: {name} still leads to the root"


def test_a_size_change_can_keep_the_root() -> None:
    """Leaf 0 of a 5-tree proves the same root as size 6: only the signed size tells them apart.

    This is why the size is part of the batch signing input (tests/core/test_batch_signing.py
    checks that such a proof fails verification).
    """
    leaves = _leaves(5)
    root, paths = merkle_tree(leaves)
    assert root_from_proof(leaves[0], BatchProof(0, 6, paths[0])) == root


@pytest.mark.parametrize(
    ("proof", "message"),
    [
        (BatchProof(0, 0, ()), "batch size"),
        (BatchProof(0, MAX_BATCH_SIZE + 1, ()), "batch size"),
        (BatchProof(3, 3, ()), "outside"),
        (BatchProof(0, 2, ()), "shorter"),
        (BatchProof(0, 1, (b"\x00" * 32,)), "longer"),
        (BatchProof(0, 2, (b"\x00" * 31,)), "32 bytes"),
        (BatchProof(0, MAX_BATCH_SIZE, (b"\x00" * 32,) * (MAX_PATH_LENGTH + 1)), "too long"),
    ],
)
def test_malformed_proofs_say_why(proof: BatchProof, message: str) -> None:
    """Each malformed proof raises BatchProofError naming its problem."""
    with pytest.raises(BatchProofError, match=message):
        root_from_proof(b"\x00" * 32, proof)


def test_path_of_10000_hashes_is_refused_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile 10,000-hash path is refused by its length alone, before any node is hashed."""
    nodes = 0
    real = batch._node

    def counting(left: bytes, right: bytes) -> bytes:
        nonlocal nodes
        nodes += 1
        return real(left, right)

    monkeypatch.setattr(batch, "_node", counting)
    proof = BatchProof(5, 10, (b"\x00" * 32,) * 10_000)
    with pytest.raises(BatchProofError, match="too long"):
        root_from_proof(b"\x00" * 32, proof)
    assert nodes == 0
    # The counter does count: a valid proof of the same tree hashes its nodes.
    leaves = _leaves(10)
    root, paths = batch.merkle_tree(leaves)
    nodes = 0
    assert root_from_proof(leaves[5], BatchProof(5, 10, paths[5])) == root
    assert nodes == len(paths[5])


def test_largest_batch_proof_has_the_maximum_path_length() -> None:
    """The last leaf of a MAX_BATCH_SIZE tree needs exactly MAX_PATH_LENGTH hashes."""
    assert 1 << MAX_PATH_LENGTH == MAX_BATCH_SIZE
    leaf = leaf_hash(b"last")
    path = tuple(leaf_hash(b"%d" % i) for i in range(MAX_PATH_LENGTH))
    root = root_from_proof(leaf, BatchProof(MAX_BATCH_SIZE - 1, MAX_BATCH_SIZE, path))
    expected = leaf
    for sibling in path:
        expected = _node(sibling, expected)
    assert root == expected
    with pytest.raises(BatchProofError):
        root_from_proof(leaf, BatchProof(MAX_BATCH_SIZE - 1, MAX_BATCH_SIZE, path[:-1]))


# --- property ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.binary(max_size=8), min_size=1, max_size=300),
    pick=st.integers(min_value=0),
    mutation=st.integers(min_value=0),
)
def test_property_proofs_verify_and_mutations_never_reach_the_root(
    data: list[bytes], pick: int, mutation: int
) -> None:
    """For any batch: the tree equals the model, the proof verifies, any mutation fails."""
    leaves = [leaf_hash(b"%d:" % i + d) for i, d in enumerate(data)]
    n = len(leaves)
    root, paths = merkle_tree(leaves)
    assert root == naive_mth(leaves)
    index = pick % n
    assert list(paths[index]) == naive_path(index, leaves)
    assert root_from_proof(leaves[index], BatchProof(index, n, paths[index])) == root
    mutations = _mutations(index, n, paths)
    name, proof = sorted(mutations.items())[mutation % len(mutations)]
    assert _outcome(leaves[index], proof) != root, name
    # Another leaf under this leaf's proof (unless it is a duplicate value).
    other = leaves[(index + 1) % n]
    if other != leaves[index]:
        assert _outcome(other, BatchProof(index, n, paths[index])) != root


def test_building_a_tree_leaves_no_reference_cycle() -> None:
    """A tree's paths are freed as soon as they are dropped, not by the garbage collector.

    (Batches are built for every frame; cycles there made the collector run
    and scan far more often under load.)
    """
    leaves = [leaf_hash(b"%d" % i) for i in range(17)]
    gc.collect()
    gc.disable()
    try:
        for _ in range(10):
            merkle_tree(leaves)
        assert gc.collect() == 0
    finally:
        gc.enable()
