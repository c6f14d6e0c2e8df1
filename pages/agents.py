"""Agents page (admins): list, create, edit (each save a new version), try a draft, archive, restore, clone.

Layout and calls only: validation, versions, diffs and the try-out's road through the gateway live in
clawdbot.agents and clawdbot.chat. A problem is shown under the field it concerns. Widget keys carry the agent's
id and version, so after a save or a restore the form starts again from what is now stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from clawdbot.agents import (
    FIELD_LABELS,
    AgentConfig,
    AgentInfo,
    Agents,
    ModelCatalog,
    Problem,
    first_blocking,
    model_catalog,
)
from clawdbot.backends import ContentDelta
from clawdbot.errors import ClawdbotError
from clawdbot.gateway import Finished, GatewayEvent
from clawdbot.models import Status
from ui.http_tools_form import http_tools_section
from ui.markdown import escape
from ui.session import require_page, runtime

NEW = "+ New agent"
NOTICE = "agents_notice"
PICK = "agent_pick"
PICK_NEXT = "agent_pick_next"

identity = require_page("agents")
st.title("Agents")
rt = runtime()
agents: Agents = rt.agents
actor = identity.user.name


@st.cache_data(ttl=10, show_spinner=False)
def server_models(host: str, mode: str, runtime_id: int) -> ModelCatalog:
    """The model server's list, asked at most every 10 s (each model costs a request to the server).

    Keyed by server and by runtime, so a runtime replaced in the same process (tests) never sees another's list.
    """
    return model_catalog(runtime().gateway.backends)


def catalog() -> ModelCatalog:
    settings = rt.settings
    return server_models(settings.ollama_host, settings.backend, id(rt))


@dataclass
class Draft:
    """What the form holds on this run, and where each field's problems go."""

    name: str
    config: AgentConfig
    slots: dict[str, DeltaGenerator]
    try_prompt: str


def show_problems(draft: Draft, problems: list[Problem]) -> None:
    by_field: dict[str, list[Problem]] = {}
    for problem in problems:
        by_field.setdefault(problem.field if problem.field in draft.slots else "model", []).append(problem)
    for field, found in by_field.items():
        with draft.slots[field].container():
            for problem in found:
                (st.error if problem.blocking else st.warning)(escape(problem.message))


def field(prefix: str, name: str) -> DeltaGenerator:
    """A keyed box for one field and its problems, so a message sits right under its field."""
    return st.container(key=f"{prefix}_field_{name}")


def editor(
    prefix: str, current: AgentInfo | None, start: AgentConfig, models: ModelCatalog
) -> tuple[Draft, str]:
    """The form; returns the draft and which button was pressed ("save", "try" or "")."""
    slots: dict[str, DeltaGenerator] = {}
    tools = agents.tool_names()
    tools += [t for t in start.tools if t not in tools]  # a tool removed since stays visible, and is reported
    with st.form(f"{prefix}_form", enter_to_submit=False):
        name = current.name if current is not None else ""
        if current is None:
            with field(prefix, "name"):
                name = st.text_input(FIELD_LABELS["name"], key=f"{prefix}_name", max_chars=64)
                slots["name"] = st.empty()
        with field(prefix, "model"):
            model = st.text_input(FIELD_LABELS["model"], value=start.model, key=f"{prefix}_model")
            if models.error:
                st.caption(f"The model server did not answer: {escape(models.error)}")
            elif models.checked:
                listed = ", ".join(
                    f"{m.name} ({m.context_length} tokens)" if m.context_length else m.name
                    for m in models.models
                )
                st.caption(f"On the model server: {escape(listed or 'no models')}")
            slots["model"] = st.empty()
        with field(prefix, "system_prompt"):
            prompt = st.text_area(
                FIELD_LABELS["system_prompt"],
                value=start.system_prompt,
                key=f"{prefix}_system_prompt",
                height=200,
            )
            slots["system_prompt"] = st.empty()
        with field(prefix, "tools"):
            chosen = st.multiselect(
                FIELD_LABELS["tools"], tools, default=list(start.tools), key=f"{prefix}_tools"
            )
            slots["tools"] = st.empty()
        budget_column, output_column = st.columns(2)
        with budget_column, field(prefix, "context_budget"):
            budget = st.number_input(
                f"{FIELD_LABELS['context_budget']} (tokens)",
                value=start.context_budget,
                step=256,
                key=f"{prefix}_context_budget",
                help="Most tokens sent: system prompt, history, attachments and the new message.",
            )
            slots["context_budget"] = st.empty()
        with output_column, field(prefix, "max_output_tokens"):
            output = st.number_input(
                f"{FIELD_LABELS['max_output_tokens']} (tokens)",
                value=start.max_output_tokens,
                step=256,
                key=f"{prefix}_max_output_tokens",
            )
            slots["max_output_tokens"] = st.empty()
        temperature_column, top_p_column = st.columns(2)
        with temperature_column, field(prefix, "temperature"):
            temperature = st.number_input(
                FIELD_LABELS["temperature"],
                value=start.temperature,
                step=0.1,
                key=f"{prefix}_temperature",
                placeholder="server default",
            )
            slots["temperature"] = st.empty()
        with top_p_column, field(prefix, "top_p"):
            top_p = st.number_input(
                FIELD_LABELS["top_p"],
                value=start.top_p,
                step=0.05,
                key=f"{prefix}_top_p",
                placeholder="server default",
            )
            slots["top_p"] = st.empty()
        with field(prefix, "fallback_model"):
            fallback = st.text_input(
                FIELD_LABELS["fallback_model"],
                value=start.fallback_model,
                key=f"{prefix}_fallback_model",
                help="Used when the model fails before its first token; empty: the server-wide fallback.",
            )
            slots["fallback_model"] = st.empty()
        think = st.toggle(FIELD_LABELS["think"], value=start.think, key=f"{prefix}_think")
        st.markdown("**Try before saving**")
        try_prompt = st.text_area(
            "Message to try",
            key=f"{prefix}_try_prompt",
            height=80,
            help="One turn with the settings above as they are now, unsaved; it is recorded in the audit log.",
        )
        with st.container(horizontal=True):
            save = st.form_submit_button(
                "Create agent" if current is None else "Save as new version",
                key=f"{prefix}_save",
                type="primary",
            )
            trial = st.form_submit_button("Try", key=f"{prefix}_try")
        slots["form"] = st.empty()
    config = AgentConfig(
        model=model,
        system_prompt=prompt or "",
        tools=tuple(chosen),
        fallback_model=fallback,
        context_budget=int(budget or 0),
        max_output_tokens=int(output or 0),
        temperature=float(temperature) if temperature is not None else None,
        top_p=float(top_p) if top_p is not None else None,
        think=think,
    )
    pressed = "save" if save else "try" if trial else ""
    return Draft(name, config, slots, try_prompt or ""), pressed


def answer_text(events: Iterator[GatewayEvent], outcome: list[Finished]) -> Iterator[str]:
    """The answer's text as it streams; the final outcome is kept in `outcome`."""
    for event in events:
        if isinstance(event, ContentDelta):
            yield event.text
        elif isinstance(event, Finished):
            outcome.append(event)


def try_out(draft: Draft) -> None:
    """Run the draft once through the gateway, as the admin, and show the answer."""
    with st.container(border=True, key="try_result"):
        st.caption("Try-out of the unsaved settings, recorded in the audit log under your name.")
        with st.chat_message("user"):
            st.text(draft.try_prompt)
        outcome: list[Finished] = []
        address = st.context.ip_address  # None from localhost, and not a string in AppTest
        events = rt.chat.try_config(
            actor,
            draft.name,
            draft.config,
            draft.try_prompt,
            client_ip=address if isinstance(address, str) else "",
        )
        with st.chat_message("assistant"):
            try:
                st.write_stream(answer_text(events, outcome))
            except ClawdbotError as exc:
                st.error(escape(exc.message))
                return
        if not outcome:
            return
        finished = outcome[0]
        if finished.thinking:
            with st.expander("Thinking"):
                st.text(finished.thinking)
        figures = f"request {finished.request_id} · {finished.model_used or draft.config.model}"
        if finished.latency_ms is not None:
            figures += f" · {finished.latency_ms / 1000:.1f} s"
        st.caption(figures)
        if finished.status != Status.OK:
            st.error(escape(f"The try-out ended with {finished.status.value}: {finished.message}"))


def submit(draft: Draft, pressed: str, current: AgentInfo | None, models: ModelCatalog) -> None:
    checks = agents.problems(draft.config, name=draft.name if current is None else None, catalog=models)
    if pressed == "try":
        checks = [p for p in checks if p.field != "name"]  # a draft may be tried before it has a name
    show_problems(draft, checks)
    if first_blocking(checks) is not None:
        draft.slots["form"].error(
            ("Not saved" if pressed == "save" else "Not tried") + ": fix the fields marked above."
        )
        return
    if pressed == "try":
        if not draft.try_prompt.strip():
            draft.slots["form"].error("Type a message to try the agent with.")
            return
        try_out(draft)
        return
    try:
        if current is None:
            saved = agents.add(actor, draft.name, draft.config)
            message = f"Created agent {escape(saved.name)} (version 1)."
        else:
            saved = agents.update(actor, current.name, draft.config)
            if saved.version == current.version:
                draft.slots["form"].info("Nothing changed, so no new version was saved.")
                return
            message = f"Saved {escape(saved.name)} as version {saved.version}."
    except ClawdbotError as exc:
        draft.slots["form"].error(escape(exc.message))
        return
    # Warnings (say, a model the server does not have yet) did not stop the save; they stay in view after it.
    done(message, saved.name, [p.message for p in checks if not p.blocking])


def actions(info: AgentInfo) -> None:
    """Archive or restore, and clone."""
    with st.container(horizontal=True, vertical_alignment="bottom"):
        if info.archived:
            restore = st.button("Restore", key="agent_restore", help="Staff can chat with it again.")
            archive = False
        else:
            archive = st.button("Archive", key="agent_archive", help="Hidden from chat; its records stay.")
            restore = False
        clone_name = st.text_input("Name of the copy", key=f"a{info.id}_clone_name")
        clone = st.button("Clone", key="agent_clone")
    clone_slot = st.empty()
    try:
        if archive or restore:
            agents.set_archived(actor, info.name, archived=archive)
            done(f"{escape(info.name)} is {'archived' if archive else 'restored'}.", info.name)
        if clone:
            copy = agents.clone(actor, info.name, clone_name or "")
            done(
                f"Created {escape(copy.name)} as a copy of {escape(info.name)} version {info.version}.",
                copy.name,
            )
    except ClawdbotError as exc:
        (clone_slot if clone else st).error(escape(exc.message))


def done(message: str, pick: str, warnings: list[str] | None = None) -> None:
    """Say what was done on the next run (once), with `pick` selected."""
    st.session_state[NOTICE] = (message, warnings or [])
    st.session_state[PICK_NEXT] = pick
    st.rerun()


def history(info: AgentInfo) -> None:
    st.subheader("Version history")
    for change in agents.history(info.name):
        version = change.version
        saved = f"{version.created_at:%Y-%m-%d %H:%M} UTC" if version.created_at else ""
        label = f"Version {version.version} · {saved} · by {version.created_by}"
        if version.version == info.version:
            label += " · current"
        with st.expander(escape(label), expanded=version.version == info.version):
            if version.version == 1:
                st.caption("The first version.")
            elif not change.changed:
                st.caption("The same settings as the version before.")
            if change.fields:
                st.dataframe(
                    [{"Setting": c.label, "Before": c.before, "After": c.after} for c in change.fields],
                    hide_index=True,
                )
            if change.prompt_diff:
                st.caption("System prompt")
                st.code(change.prompt_diff, language="diff")
            if version.version != info.version and st.button(
                f"Restore version {version.version}",
                key=f"restore_version_{version.version}",
                help="Saves these settings as a new version; no version is ever changed or deleted.",
            ):
                try:
                    saved_as = agents.restore_version(actor, info.name, version.version)
                except ClawdbotError as exc:
                    st.error(escape(exc.message))
                else:
                    done(
                        f"Saved version {version.version}'s settings as version {saved_as.version}.",
                        info.name,
                    )


def row(info: AgentInfo) -> dict[str, Any]:
    config = info.config
    return {
        "Name": info.name,
        "Version": info.version,
        "Model": config.model,
        "Tools": ", ".join(config.tools),
        "Context budget": config.context_budget,
        "Output limit": config.max_output_tokens,
        "Status": "archived" if info.archived else "active",
        "Saved by": info.created_by,
    }


notice = st.session_state.pop(NOTICE, None)
if notice is not None:
    st.success(notice[0])
    for warning in notice[1]:
        st.warning(escape(warning))

show_archived = st.toggle("Show archived agents", key="show_archived")
everything = agents.all(include_archived=True)
listed = [a for a in everything if show_archived or not a.archived]
if listed:
    st.dataframe([row(a) for a in listed], hide_index=True)
else:
    st.info("No agents yet: create the first one below.")

pending = st.session_state.pop(PICK_NEXT, None)
if pending is not None:
    st.session_state[PICK] = pending
# The agent being worked on stays selectable after it is archived, even while archived ones are hidden.
options = [NEW, *(a.name for a in everything if a in listed or a.name == st.session_state.get(PICK))]
if st.session_state.get(PICK) not in options:
    st.session_state[PICK] = NEW
picked = st.selectbox("Agent", options, key=PICK)
st.divider()

models = catalog()
if picked == NEW:
    st.subheader("New agent")
    start = AgentConfig(model=rt.settings.default_model, context_budget=rt.settings.context_budget)
    draft, pressed = editor("new", None, start, models)
    if pressed:
        submit(draft, pressed, None, models)
else:
    info = next(a for a in everything if a.name == picked)
    st.subheader(escape(info.name))
    st.caption(f"Version {info.version}" + (" · archived: hidden from chat" if info.archived else ""))
    actions(info)
    draft, pressed = editor(f"a{info.id}v{info.version}", info, info.config, models)
    if pressed:
        submit(draft, pressed, info, models)
    history(info)

st.divider()
http_tools_section(rt.chat.http_tools, actor)
