"""Canonical names shared by every adapter: scenarios, action flags, time units.

Action flags are stored per event as a uint32 bit mask; each store lists its own action names in bit order
(``meta.json: actions``), so any subset of the vocabulary below (and extra ``is_*`` flags) can be present.
"""

from __future__ import annotations

#: Default scenario names of the paper (any named set works).
PAPER_SCENARIOS = ("homefeed", "ads", "search")

#: Engagement flags, in the order of the RED-MMU struct listing (paper appendix), without the ``is_`` prefix.
KNOWN_ACTIONS = (
    "click",
    "like",
    "collect",
    "share",
    "comment",
    "follow",
    "message",
    "hide",
    "click_profile",
    "read_comment",
    "videoend",
    "nns",
    "pagetime",
)

MAX_ACTIONS = 32  # bits in the uint32 mask

TIME_UNITS = ("seconds", "ordinal")


def action_field_name(action: str) -> str:
    """RED-MMU / reference-json field name of an action flag (``click`` -> ``is_click``)."""
    return f"is_{action}"
