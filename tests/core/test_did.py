"""did:key encoding and decoding against published examples and hostile input."""

from __future__ import annotations

import base58
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigwire.errors import InvalidDidError, SigningError
from sigwire.signing import Identity, did_from_public_key, public_key_from_did

ZERO_SEED_DID = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"
ZERO_SEED_PUBLIC = bytes.fromhex("3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29")
SEED_4F = bytes.fromhex("4f66b355aa7b0980ff901f2295b9c562ac3061be4df86703eb28c612faae6578")
SEED_4F_DID = "did:key:z6Mkk7yqnGF3YwTrLpqrW6PGsKci7dNqh1CjnvMbzrMerSeL"
SPEC_DID = "did:key:z6MkmjY8GnV5i9YTDtPETC2uUAW6ejw3nk5mXF5yci5ab7th"
SPEC_PUBLIC_B58 = "8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQqEB3nS7Zfu7K"


def _did_of(raw: bytes) -> str:
    """A did:key whose base58btc body encodes ``raw`` (multicodec prefix included)."""
    return "did:key:z" + base58.b58encode(raw).decode()


def test_zero_seed_gives_published_did() -> None:
    """The all-zero RFC 8032 seed yields its published public key and did:key."""
    identity = Identity.from_seed(bytes(32))
    assert identity.public_key == ZERO_SEED_PUBLIC
    assert identity.did == ZERO_SEED_DID
    assert did_from_public_key(ZERO_SEED_PUBLIC) == ZERO_SEED_DID


def test_published_seed_gives_published_did() -> None:
    """Seed 4f66b3... yields did:key:z6Mkk7yq..., as published."""
    assert Identity.from_seed(SEED_4F).did == SEED_4F_DID


def test_published_did_resolves_to_published_key() -> None:
    """The did:key spec example resolves to the base58 public key it lists."""
    assert public_key_from_did(SPEC_DID) == base58.b58decode(SPEC_PUBLIC_B58)


@pytest.mark.parametrize("did", [ZERO_SEED_DID, SEED_4F_DID, SPEC_DID])
def test_published_dids_round_trip(did: str) -> None:
    """Resolving a DID and re-encoding its key gives the same DID."""
    assert did_from_public_key(public_key_from_did(did)) == did


@pytest.mark.parametrize("key", [bytes(range(32)), ZERO_SEED_PUBLIC])
def test_public_key_round_trips(key: bytes) -> None:
    """Encoding a 32-byte key and resolving the DID gives the same key back."""
    did = did_from_public_key(key)
    assert did.startswith("did:key:z6Mk")
    assert public_key_from_did(did) == key


def test_generated_identity_round_trips() -> None:
    """A fresh identity's DID resolves to its public key."""
    identity = Identity.generate()
    assert public_key_from_did(identity.did) == identity.public_key


GOOD = SEED_4F_DID

MALFORMED = {
    "empty": "",
    "garbage": "not a did at all",
    "bare did": "did",
    "did: only": "did:",
    "did:key: only": "did:key:",
    "no key body": "did:key:z",
    "http url": "https://example.com/",
    "urn": "urn:uuid:6f1c2b1e-7d43-4c38-9a0e-2f4b8c1d5e6a",
    "bare base58": GOOD.removeprefix("did:key:z"),
    "did:web": "did:web:example.com",
    "did:example": "did:example:123456789abcdefghi",
    "did:key multibase f": "did:key:fed01" + ZERO_SEED_PUBLIC.hex(),
    "did:key multibase m": "did:key:m7QE" + "A" * 40,
    "upper-case scheme": "DID:KEY:" + GOOD.removeprefix("did:key:"),
    "upper-cased body": GOOD.upper(),
    "truncated by one": GOOD[:-1],
    "truncated by half": GOOD[: len(GOOD) // 2],
    "one char extra": GOOD + "a",
    "base58 zero": GOOD[:-1] + "0",
    "base58 capital O": GOOD[:-1] + "O",
    "base58 capital I": GOOD[:-1] + "I",
    "base58 lower l": GOOD[:-1] + "l",
    "non-ascii": GOOD[:-1] + "\u00e9",
    "nul byte": GOOD[:-1] + "\x00",
    "leading space": " " + GOOD,
    "trailing space": GOOD + " ",
    "trailing newline": GOOD + "\n",
    "trailing tab": GOOD + "\t",
    "extra leading 1 (zero byte)": "did:key:z1" + GOOD.removeprefix("did:key:z"),
    "secp256k1 multicodec": _did_of(b"\xe7\x01" + b"\x02" * 33),
    "x25519 multicodec": _did_of(b"\xec\x01" + bytes(32)),
    "multicodec missing second byte": _did_of(b"\xed" + bytes(32)),
    "key of 31 bytes": _did_of(b"\xed\x01" + b"\x01" * 31),
    "key of 33 bytes": _did_of(b"\xed\x01" + b"\x01" * 33),
    "key of 0 bytes": _did_of(b"\xed\x01"),
    "key of 64 bytes": _did_of(b"\xed\x01" + b"\x01" * 64),
    "very long base58": "did:key:z" + "2" * 10_000,
    "very long garbage": "x" * 1_000_000,
    "very long did:web": "did:web:" + "a" * 100_000,
}


@pytest.mark.parametrize("did", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_did_raises_invalid_did_error(did: str) -> None:
    """A malformed, non-canonical or non-Ed25519 DID raises InvalidDidError and nothing else."""
    with pytest.raises(InvalidDidError) as info:
        public_key_from_did(did)
    assert info.value.did == did
    assert len(str(info.value)) < 400  # a huge DID is truncated in the message


def test_invalid_did_error_is_a_signing_error() -> None:
    """InvalidDidError is a SigningError with reason DID_INVALID."""
    with pytest.raises(SigningError) as info:
        public_key_from_did("did:web:example.com")
    assert info.value.reason == "DID_INVALID"


def test_malformed_did_is_refused_again_after_first_refusal() -> None:
    """A refused DID is refused again (failures are not cached as successes)."""
    for _ in range(2):
        with pytest.raises(InvalidDidError):
            public_key_from_did(GOOD + " ")


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_did_from_public_key_refuses_wrong_length(length: int) -> None:
    """did_from_public_key refuses a key that is not 32 bytes with InvalidDidError."""
    with pytest.raises(InvalidDidError, match=f"not {length}"):
        did_from_public_key(b"\x01" * length)


@pytest.mark.parametrize(
    "key_hex",
    [
        "01" + "00" * 31,  # the identity point (order 1)
        "ec" + "ff" * 30 + "7f",  # order 2
        "00" * 32,  # order 4
        "00" * 31 + "80",  # order 4, other sign
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    ],
)
def test_small_order_keys_are_refused(key_hex: str) -> None:
    """A did:key holding a small-order point (forgeable by anyone) is DID_INVALID."""
    did = "did:key:z" + base58.b58encode(b"\xed\x01" + bytes.fromhex(key_hex)).decode()
    with pytest.raises(InvalidDidError, match="small-order"):
        public_key_from_did(did)


@pytest.mark.parametrize(
    ("key_hex", "problem"),
    [
        ("02" + "00" * 31, "not a point"),
        ("ff" * 32, "canonical"),  # y >= p
    ],
)
def test_off_curve_and_noncanonical_keys_are_refused(key_hex: str, problem: str) -> None:
    """Bytes that are not a canonical curve point never resolve to a key."""
    did = "did:key:z" + base58.b58encode(b"\xed\x01" + bytes.fromhex(key_hex)).decode()
    with pytest.raises(InvalidDidError, match=problem):
        public_key_from_did(did)


# --- the key check against RFC 8032's decoding --------------------------------------------

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P


def _rfc8032_problem(key: bytes) -> str:
    """The model: decode x as RFC 8032 section 5.1.3 does, then multiply by the cofactor 8."""
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    sign = key[31] >> 7
    if y >= _P:
        return "canonical"
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if (x * x - x2) % _P:
        return "not a point"
    if x == 0 and sign:
        return "canonical"
    if x & 1 != sign:
        x = _P - x
    for _ in range(3):  # P -> 2P on -x^2 + y^2 = 1 + d x^2 y^2
        xx, yy = x * x % _P, y * y % _P
        x, y = (
            2 * x * y * pow((yy - xx) % _P, -1, _P) % _P,
            (yy + xx) * pow((2 + xx - yy) % _P, -1, _P) % _P,
        )
    return "small-order" if (x, y) == (0, 1) else ""


def _problem(key: bytes) -> str:
    did = "did:key:z" + base58.b58encode(b"\xed\x01" + key).decode()
    try:
        public_key_from_did(did)
    except InvalidDidError as exc:
        for word in ("canonical", "not a point", "small-order"):
            if word in str(exc):
                return word
        raise
    return ""


def _edge_keys() -> list[bytes]:
    # Every y within 40 of 0, of p and of the small-order ys, both signs; and
    # the non-canonical encodings y + p of the smallest ys.
    ys = [y % 2**255 for c in (0, _P, *_small_order_ys()) for y in range(c - 40, c + 41)]
    ys += [y + _P for y in range(19)]
    return [
        (y | sign << 255).to_bytes(32, "little") for y in ys if 0 <= y < 2**255 for sign in (0, 1)
    ]


def _small_order_ys() -> list[int]:
    return [
        int.from_bytes(bytes.fromhex(h), "little")
        for h in (
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        )
    ]


def test_key_check_agrees_with_rfc8032_decoding_near_every_edge() -> None:
    """Around 0, p and each small-order y, both signs: the same verdict as the model."""
    keys = _edge_keys()
    verdicts = {key: _rfc8032_problem(key) for key in keys}
    assert {v for v in verdicts.values()} == {"", "canonical", "not a point", "small-order"}
    assert {key.hex(): _problem(key) for key in keys} == {k.hex(): v for k, v in verdicts.items()}


@given(st.binary(min_size=32, max_size=32))
def test_key_check_agrees_with_rfc8032_decoding(key: bytes) -> None:
    """Any 32 bytes: refused for the same reason as RFC 8032's decoding says, or accepted."""
    assert _problem(key) == _rfc8032_problem(key)


def test_real_public_keys_pass_the_key_check() -> None:
    """Keys of generated identities are never refused (half have the sign bit set)."""
    keys = [Identity.generate().public_key for _ in range(64)]
    assert {_problem(key) for key in keys} == {""}
