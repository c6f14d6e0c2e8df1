"""The agents page's section for admin-defined HTTP tools: the list, and a form to add or change one.

Layout and calls only: parsing, validation and saving live in `clawdbot.http_tools`. Header values are never
put on the page: the form shows each stored header as `Name: ••••••`, and saving it unchanged keeps the value.
"""

from __future__ import annotations

import json

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from clawdbot.agents import Problem, first_blocking
from clawdbot.errors import ClawdbotError
from clawdbot.http_tools import (
    EMPTY_SCHEMA,
    MASK,
    METHODS,
    HttpToolConfig,
    HttpTools,
    config_from_form,
    masked_headers_text,
)
from ui.markdown import escape

NEW_TOOL = "+ New HTTP tool"
PICK = "http_tool_pick"
PICK_NEXT = "http_tool_pick_next"
NOTICE = "http_tool_notice"
FIELDS = ("name", "description", "parameters", "url", "method", "headers", "timeout_s", "max_response_bytes")
EXAMPLE_SCHEMA = {
    "type": "object",
    "required": ["city"],
    "properties": {"city": {"type": "string", "description": "City name"}},
}


def http_tools_section(tools: HttpTools, actor: str) -> None:
    """List the HTTP tools and edit one; every save is checked and recorded as an event."""
    st.subheader("HTTP tools")
    st.caption(
        "Web calls an agent may make. Arguments are checked against the JSON schema before any call; calls "
        "reach public addresses only, unless an operator allows a host with CLAWDBOT_TOOL_ALLOWLIST."
    )
    notice = st.session_state.pop(NOTICE, None)
    if notice:
        st.success(notice)
    stored = tools.all()
    if stored:
        st.dataframe(
            [
                {
                    "Name": info.config.name,
                    "Method": info.config.method,
                    "URL": info.config.shown()["url"],
                    "Headers": ", ".join(f"{h}: {MASK}" for h in info.config.headers),
                    "Timeout (s)": info.config.timeout_s,
                    "Response cap (bytes)": info.config.max_response_bytes,
                    "Status": "disabled" if info.config.disabled else "enabled",
                }
                for info in stored
            ],
            hide_index=True,
            key="http_tools_table",
        )
    names = [info.config.name for info in stored]
    pending = st.session_state.pop(PICK_NEXT, None)
    if pending in names:
        st.session_state[PICK] = pending
    picked = st.selectbox("HTTP tool", [NEW_TOOL, *names], key=PICK)
    current = next((info.config for info in stored if info.config.name == picked), None)
    _form(tools, actor, current)


def _form(tools: HttpTools, actor: str, current: HttpToolConfig | None) -> None:
    start = current or HttpToolConfig(name="", description="", url="https://", parameters=EXAMPLE_SCHEMA)
    prefix = f"http_tool_{current.name}" if current is not None else "http_tool_new"
    slots: dict[str, DeltaGenerator] = {}
    with st.form(f"{prefix}_form", enter_to_submit=False):
        name = st.text_input("Tool name", value=start.name, key=f"{prefix}_name", max_chars=64)
        slots["name"] = st.empty()
        description = st.text_area(
            "Description (the model reads it to choose the tool)",
            value=start.description,
            key=f"{prefix}_description",
        )
        slots["description"] = st.empty()
        parameters = st.text_area(
            "Parameters (JSON schema of an object)",
            value=json.dumps(start.parameters or EMPTY_SCHEMA, indent=2, ensure_ascii=False),
            key=f"{prefix}_parameters",
            height=180,
        )
        slots["parameters"] = st.empty()
        url = st.text_input(
            "URL ({parameter} placeholders allowed in the path and query)",
            value=start.url,
            key=f"{prefix}_url",
        )
        slots["url"] = st.empty()
        method = st.selectbox("Method", METHODS, index=METHODS.index(start.method), key=f"{prefix}_method")
        slots["method"] = st.empty()
        headers = st.text_area(
            "Headers (one 'Name: value' per line; stored values show as ••••••, keep them to leave them unchanged)",
            value=masked_headers_text(start.headers),
            key=f"{prefix}_headers",
            height=80,
        )
        slots["headers"] = st.empty()
        timeout_column, cap_column = st.columns(2)
        timeout_s = timeout_column.number_input(
            "Timeout (seconds)", value=float(start.timeout_s), step=1.0, key=f"{prefix}_timeout_s"
        )
        slots["timeout_s"] = timeout_column.empty()
        max_bytes = cap_column.number_input(
            "Response cap (bytes)",
            value=int(start.max_response_bytes),
            step=100_000,
            key=f"{prefix}_max_bytes",
        )
        slots["max_response_bytes"] = cap_column.empty()
        disabled = st.toggle(
            "Disabled (agents stop getting it)", value=start.disabled, key=f"{prefix}_disabled"
        )
        saved = st.form_submit_button(
            "Add HTTP tool" if current is None else "Save HTTP tool", type="primary", key=f"{prefix}_save"
        )
        slots["form"] = st.empty()
    if not saved:
        return
    config, problems = config_from_form(
        name=name or "",
        description=description or "",
        parameters=parameters or "",
        url=url or "",
        method=str(method),
        headers=headers or "",
        timeout_s=float(timeout_s or 0),
        max_response_bytes=int(max_bytes or 0),
        disabled=disabled,
        stored_headers=current.headers if current is not None else None,
    )
    if config is not None:
        problems = config.problems(tools.allowlist)
    _show(slots, problems)
    if config is None or first_blocking(problems) is not None:
        slots["form"].error("Not saved: fix the fields marked above.")
        return
    try:
        tools.save(actor, config, original=current.name if current is not None else None)
    except ClawdbotError as exc:
        slots["form"].error(escape(exc.message))
        return
    warnings = " ".join(p.message for p in problems if not p.blocking)
    st.session_state[NOTICE] = f"Saved the HTTP tool {config.name}." + (
        f" Note: {warnings}" if warnings else ""
    )
    st.session_state[PICK_NEXT] = config.name
    st.rerun()


def _show(slots: dict[str, DeltaGenerator], problems: list[Problem]) -> None:
    """Each problem under its field (several in one box when a field has more than one)."""
    by_field: dict[str, list[Problem]] = {}
    for problem in problems:
        by_field.setdefault(problem.field if problem.field in slots else "form", []).append(problem)
    for field, found in by_field.items():
        with slots[field].container():
            for problem in found:
                (st.error if problem.blocking else st.warning)(escape(problem.message))
