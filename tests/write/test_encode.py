"""Property tests: the write encoder is the exact inverse of the driver's decoder."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from drivers.modbus import ModbusTag, _FORMATS, _packed, compile_decoder, encode_value
from gateway.model import WriteRefused

ORDERS = st.sampled_from(["big", "little"])
NUMERIC = sorted(_FORMATS)


def decoded(tag: ModbusTag, registers: list[int]):
    return compile_decoder(tag, 0)(registers, *_packed(registers))


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(NUMERIC), byte_order=ORDERS, word_order=ORDERS, data=st.data())
def test_registers_decode_then_encode_to_the_same_registers(type_, byte_order, word_order, data):
    width = _FORMATS[type_][1]
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=width, max_size=width))
    tag = ModbusTag(name="t", address=0, type=type_, byte_order=byte_order, word_order=word_order, writable=True)
    value = decoded(tag, registers)
    if isinstance(value, float) and not math.isfinite(value):
        with pytest.raises(WriteRefused):
            encode_value(tag, value)
        return
    assert encode_value(tag, value) == registers
    assert decoded(tag, encode_value(tag, value)) == value


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(["int16", "uint16", "int32", "uint32"]), byte_order=ORDERS, word_order=ORDERS,
       scale=st.sampled_from([0.1, 0.01, 0.5, 2.0, -1.0, 10.0]), offset=st.sampled_from([0.0, -40.0, 273.15]),
       data=st.data())
def test_scaled_values_round_trip_exactly(type_, byte_order, word_order, scale, offset, data):
    low, high = {"int16": (-32768, 32767), "uint16": (0, 65535), "int32": (-2**31, 2**31 - 1),
                 "uint32": (0, 2**32 - 1)}[type_]
    raw = data.draw(st.integers(low, high))
    tag = ModbusTag(name="t", address=0, type=type_, byte_order=byte_order, word_order=word_order, scale=scale,
                    offset=offset, writable=True)
    value = raw * scale + offset  # what the decoder gives for the raw register value
    registers = encode_value(tag, value)
    assert decoded(tag, registers) == value
    assert len(registers) == _FORMATS[type_][1] and all(0 <= r <= 0xFFFF for r in registers)


@settings(max_examples=200, deadline=None)
@given(type_=st.sampled_from(["float32", "float64"]), byte_order=ORDERS, word_order=ORDERS,
       value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_floats_round_trip(type_, byte_order, word_order, value):
    tag = ModbusTag(name="t", address=0, type=type_, byte_order=byte_order, word_order=word_order, writable=True)
    assert decoded(tag, encode_value(tag, value)) == value


@given(text=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=8), byte_order=ORDERS)
def test_strings_round_trip(text, byte_order):
    # the decoder strips trailing white space (devices pad with blanks), so such text reads back shorter
    text = text.rstrip()
    tag = ModbusTag(name="t", address=0, type="string", count=4, byte_order=byte_order, writable=True)
    assert decoded(tag, encode_value(tag, text)) == text


@given(type_=st.sampled_from(["int16", "uint16", "int32", "uint32", "int64", "uint64"]), overshoot=st.integers(1, 1000))
def test_integer_overflow_after_reverse_scaling_is_refused_not_wrapped(type_, overshoot):
    bits = {"int16": 15, "uint16": 16, "int32": 31, "uint32": 32, "int64": 63, "uint64": 64}[type_]
    # 64-bit limits are beyond a float's 53-bit mantissa: exact integers there (scale 1)
    scale = 1 if bits > 32 else 0.5
    tag = ModbusTag(name="t", address=0, type=type_, scale=scale, writable=True)
    high = (1 << bits) - 1
    low = -(1 << bits) if type_.startswith("int") else 0
    for raw in (high + overshoot, low - overshoot):
        with pytest.raises(WriteRefused) as refused:
            encode_value(tag, raw * scale)
        assert refused.value.reason == "out_of_range"
    assert decoded(tag, encode_value(tag, high * scale)) == high * scale  # the limit itself fits


@pytest.mark.parametrize("type_, value, reason", [
    ("uint16", "12", "wrong_type"), ("uint16", True, "wrong_type"), ("int16", 1.5, "out_of_range"),
    ("float32", 1e39, "out_of_range"), ("float64", float("nan"), "wrong_type"), ("uint16", -1, "out_of_range"),
])
def test_values_that_do_not_fit_are_refused(type_, value, reason):
    tag = ModbusTag(name="t", address=0, type=type_, writable=True)
    with pytest.raises(WriteRefused) as refused:
        encode_value(tag, value)
    assert refused.value.reason == reason


def test_bool_coils_and_strings():
    coil = ModbusTag(name="c", table="coil", address=0, type="bool", writable=True)
    assert encode_value(coil, True) is True and encode_value(coil, 0) is False
    with pytest.raises(WriteRefused):
        encode_value(coil, "on")
    text = ModbusTag(name="s", address=0, type="string", count=2, writable=True)
    with pytest.raises(WriteRefused):
        encode_value(text, "too long")
