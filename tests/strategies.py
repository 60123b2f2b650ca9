"""Hypothesis strategies for messages, shared by the message and codec tests."""

from __future__ import annotations

from hypothesis import strategies as st

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
#: Keys, with the ones that mean something to hbtrio drawn often.
keys = st.text(max_size=6) | st.sampled_from(["priv", "a", "b", "slot"])
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=24,
)
messages = st.dictionaries(keys, values, max_size=6)
