"""The one-call block decoder of a read request gives what the per-tag decoders give."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus import ModbusTag, decode_request, plan_reads

TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]


@st.composite
def layouts(draw):
    order = draw(st.sampled_from(["big", "little"]))
    mixed = draw(st.booleans())  # sometimes a second byte order or a little word order: no block
    tags, address = [], 0
    for i in range(draw(st.integers(1, 12))):
        address += draw(st.integers(0, 3))
        type_ = draw(st.sampled_from(TYPES))
        tags.append(ModbusTag(name=f"t{i}", address=address, type=type_,
                              byte_order=draw(st.sampled_from(["big", "little"])) if mixed else order,
                              word_order=draw(st.sampled_from(["big", "little"])) if mixed else "big",
                              scale=draw(st.sampled_from([1.0, 0.1, -2.0])), offset=draw(st.sampled_from([0.0, 5.0]))))
        address += draw(st.sampled_from([0, 1, 2, 4]))  # 0..: sometimes overlapping the next
    return tags


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_block_values_equal_the_per_tag_decoders(tags, data):
    for request in plan_reads(tags, max_gap=4):
        registers = data.draw(st.lists(st.integers(0, 65535), min_size=request.count, max_size=request.count))
        per_tag = decode_request(request, registers)
        block = request.block_values(registers)
        if block is None:
            eligible = request._block is not False
            assert not eligible or any(p is not None for _, _, p in per_tag)
            continue
        assert all(p is None for _, _, p in per_tag)
        for (tag, value, _), fast in zip(per_tag, block, strict=True):
            assert type(fast) is type(value), tag
            assert fast == value or (isinstance(value, float) and math.isclose(fast, value, rel_tol=1e-15)), tag
