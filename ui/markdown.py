"""Showing names people chose inside Streamlit's Markdown (titles, labels) exactly as they were typed."""

from __future__ import annotations

import re

# Characters Markdown (and Streamlit's extensions: colors, icons, emoji) would read as formatting.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$])")


def escape(text: str) -> str:
    """`text` with every Markdown special character escaped, so "my_agent_v2" is not shown in italics."""
    return _SPECIAL.sub(r"\\\1", text)
