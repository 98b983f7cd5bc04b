"""Property-based decoding of hostile bytes and text: a value or EnvelopeError, nothing else.

These are the functions every transport runs on what arrives from the
network before anything is verified, so they must never raise anything but
:class:`sigwire.EnvelopeError` (MALFORMED), whatever the input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sigwire
from sigwire import _proto
from tests.hostile.conftest import outcome

pb = _proto.pb
FUZZ = settings(max_examples=150, deadline=None)

BINARY_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "decode_envelope": _proto.decode_envelope,
    "decode_reply": _proto.decode_reply,
    "decode_card": _proto.decode_card,
    "frame_to_json": _proto.frame_to_json,
}
TEXT_DECODERS: dict[str, Callable[[str], Any]] = {
    "frame_from_json": _proto.frame_from_json,
    "card_from_json": _proto.card_from_json,
}


def _decodes_or_refuses(decode: Callable[[Any], Any], data: bytes | str) -> None:
    result = outcome(decode, data)
    if isinstance(result, sigwire.SigwireError):
        assert isinstance(result, sigwire.EnvelopeError)
        assert result.reason == "MALFORMED"
    else:
        assert result is not None


def _valid_messages() -> dict[str, bytes]:
    me = sigwire.Identity.from_seed(bytes(range(32)))
    env = me.sign_envelope(
        sigwire.Envelope.new(
            "echo",
            b"payload \x00\xff",
            sender=me.did,
            metadata={"k": "v", "\u00e9": "x"},
            context_id="ctx",
        )
    )
    reply = me.sign_reply(
        sigwire.Reply(request_id=env.id, request_digest=env.digest(), responder=me.did, data=b"d")
    )
    card = me.sign_card(sigwire.AgentCard(did=me.did, endpoints=("grpc://h:1",), kinds=("echo",)))
    frame = pb.Frame(sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(env)]))
    return {
        "envelope": _proto.envelope_to_pb(env).SerializeToString(),
        "reply": _proto.reply_to_pb(reply).SerializeToString(),
        "card": _proto.card_to_pb(card).SerializeToString(),
        "frame": frame.SerializeToString(),
    }


VALID = _valid_messages()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid serialized message with bytes flipped, cut, inserted or spliced."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            other = VALID[draw(st.sampled_from(sorted(VALID)))]
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


JSON_KEYS = st.sampled_from(
    [
        "sequence",
        "envelopes",
        "replies",
        "ack",
        "ping",
        "pong",
        "goaway",
        "id",
        "kind",
        "sender",
        "payload",
        "metadata",
        "createdAtMs",
        "created_at_ms",
        "nonce",
        "signature",
        "value",
        "algorithm",
        "signer",
        "token",
        "graceMs",
        "did",
        "endpoints",
        "kinds",
        "maxMessageSize",
    ]
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["AAAA", "AA==", "!!", "1e3", "-1", "18446744073709551616", "\ud800"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(JSON_KEYS, st.text(max_size=8)), children, max_size=4),
    ),
    max_leaves=20,
)


@st.composite
def frame_shaped_json(draw: st.DrawFn) -> str:
    """JSON text that looks like a Frame (or a card) but holds hostile values."""
    value = draw(st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=4))
    # ensure_ascii escapes lone surrogates as \ud800, which JSON readers accept.
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


@FUZZ
@pytest.mark.parametrize("decode", BINARY_DECODERS.values(), ids=BINARY_DECODERS.keys())
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_malformed(
    decode: Callable[[bytes], Any], data: bytes
) -> None:
    """Arbitrary bytes decode to a value or raise EnvelopeError (MALFORMED), nothing else."""
    _decodes_or_refuses(decode, data)


@FUZZ
@pytest.mark.parametrize("decode", BINARY_DECODERS.values(), ids=BINARY_DECODERS.keys())
@given(data=mutated())
def test_mutated_messages_decode_or_are_malformed(
    decode: Callable[[bytes], Any], data: bytes
) -> None:
    """Valid messages with bytes flipped, cut or spliced decode or raise EnvelopeError."""
    _decodes_or_refuses(decode, data)


@FUZZ
@pytest.mark.parametrize("decode", TEXT_DECODERS.values(), ids=TEXT_DECODERS.keys())
@given(text=st.text(max_size=512))
def test_arbitrary_text_decodes_or_is_malformed(decode: Callable[[str], Any], text: str) -> None:
    """Arbitrary text given as a JSON frame or card decodes or raises EnvelopeError."""
    _decodes_or_refuses(decode, text)


@FUZZ
@pytest.mark.parametrize("decode", TEXT_DECODERS.values(), ids=TEXT_DECODERS.keys())
@given(text=frame_shaped_json())
def test_frame_shaped_json_decodes_or_is_malformed(decode: Callable[[str], Any], text: str) -> None:
    """JSON with Frame and card field names but hostile values decodes or is MALFORMED."""
    _decodes_or_refuses(decode, text)


@FUZZ
@given(text=frame_shaped_json())
def test_accepted_json_frames_are_frames(text: str) -> None:
    """Whatever frame_from_json accepts is serialized Frame bytes that decode again."""
    data = outcome(_proto.frame_from_json, text)
    if isinstance(data, sigwire.EnvelopeError):
        return
    frame = pb.Frame.FromString(data)
    assert frame.SerializeToString() == data
    json.loads(_proto.frame_to_json(data))


@pytest.mark.parametrize("decode", TEXT_DECODERS.values(), ids=TEXT_DECODERS.keys())
def test_a_field_name_with_an_unpaired_surrogate_is_malformed(decode: Callable[[str], Any]) -> None:
    """upb raises SystemError on such a name; the decoders must say MALFORMED instead."""
    with pytest.raises(sigwire.EnvelopeError):
        decode('{"\\ud800": 1}')
