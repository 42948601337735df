"""`check_node_id` (config validation without asyncua) accepts exactly what asyncua parses."""

from __future__ import annotations

import pytest
from asyncua import ua
from hypothesis import given, settings, strategies as st

from drivers.opcua import check_node_id


def asyncua_accepts(text: str) -> bool:
    try:
        ua.NodeId.from_string(text)
    except Exception:  # noqa: BLE001 - asyncua raises several types for a bad id
        return False
    return True


def ours_accepts(text: str) -> bool:
    try:
        check_node_id(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("text", [
    "ns=2;s=Oven.Temperature", "i=85", "ns=1;i=1001", "ns=3;s=a;b=c", "s=", "g=72962b91-fa75-4ae6-8d28-b404dc7daf63",
    "ns=2;b=0x0a0b", "ns=2;b=aGVsbG8=", "nsu=urn:x;s=Tag", "srv=1;ns=2;i=5", "ns=2;x=1;i=3", ";;i=1",
    "not a node id;;", "nope;;", "ns=2", "", "ns=a;i=1", "i=x", "g=nope", "ns=2;b=0xzz", "srv=q;i=1", "=;i=1",
])
def test_examples_agree_with_asyncua(text):
    assert ours_accepts(text) == asyncua_accepts(text), text


_PART = st.one_of(
    st.sampled_from(["ns", "i", "s", "g", "b", "srv", "nsu", "x", " ns ", ""]).flatmap(
        lambda key: st.one_of(st.integers(-5, 70000).map(str), st.uuids().map(str), st.text(max_size=6),
                              st.just("0x0a"), st.just("0xz"), st.just("aGk="))
        .map(lambda value: f"{key}={value}")),
    st.text(max_size=5),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PART, max_size=4).map(";".join))
def test_generated_ids_agree_with_asyncua(text):
    assert ours_accepts(text) == asyncua_accepts(text), text
