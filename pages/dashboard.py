"""Dashboard page (admins): GPUs, Ollama and its loaded models, the gateway now, traffic charts, last requests.

The live part refreshes every 2 s in place (`st.fragment(run_every=...)`). Readings come from the process's one
background sampler (`clawdbot.sampler`), charts from the rollups (`clawdbot.metrics`); nothing here polls a
device or writes SQL. Model names and users come from outside, so they are shown as table cells and plain text.
"""

from __future__ import annotations

from datetime import timedelta

import streamlit as st

from clawdbot.admission import AdmissionStats
from clawdbot.backends import BackendError
from clawdbot.gpu import GpuStatus
from clawdbot.metrics import WINDOWS, history, last_requests, refusals_last_minute, traffic
from clawdbot.models import utcnow
from clawdbot.sampler import SAMPLE_INTERVAL_S, OllamaState
from ui.dashboard_charts import gib, history_figure, in_words, traffic_figures
from ui.session import require_page, runtime

identity = require_page("dashboard")
st.title("Dashboard")

_NOTICE = "dashboard_notice"
rt = runtime()
sampler = rt.sampler
sampler.start()  # already running in the server; started here too when a page runs before it (tests)


def _gpus(gpu: GpuStatus) -> None:
    st.subheader("GPU")
    if not gpu.available:
        st.info(gpu.message)
        return
    for g in gpu.gpus:
        st.caption(f"GPU {g.index}: {g.name}")
        a, b, c, d = st.columns(4)
        a.metric(
            "Memory",
            f"{gib(g.memory_used)} / {gib(g.memory_total)}",
            f"{100 * g.memory_fraction:.0f} %",
            delta_color="off",
        )
        b.metric("Utilisation", "—" if g.utilization_pct is None else f"{g.utilization_pct} %")
        c.metric("Temperature", "—" if g.temperature_c is None else f"{g.temperature_c} °C")
        power = "—" if g.power_w is None else f"{g.power_w:.0f} W"
        limit = "" if g.power_limit_w is None else f" / {g.power_limit_w:.0f} W"
        d.metric("Power", power + limit)


def _ollama(state: OllamaState) -> None:
    st.subheader("Ollama")
    if not state.used:
        st.info(
            "Ollama is not used: CLAWDBOT_BACKEND is `embedded`, so the embedded model answers every request."
        )
        return
    if not state.reachable:
        st.error(f"Ollama does not answer: {state.error}")
        return
    st.caption(f"Reachable at {state.host} · version {state.version}")
    if not state.loaded:
        st.caption("No model is loaded in memory now; the next request loads its model first.")
        return
    now = utcnow()
    st.dataframe(
        [
            {
                "model": m.name,
                "size": gib(m.size),
                "in VRAM": gib(m.size_vram),
                "context length": m.context_length,
                "unloads in": "—" if m.expires_at is None else in_words((m.expires_at - now).total_seconds()),
            }
            for m in state.loaded
        ],
        hide_index=True,
        key="loaded_models",
    )


def _gateway(stats: AdmissionStats) -> None:
    st.subheader("Gateway now")
    refused = refusals_last_minute(rt.db)
    a, b, c, d = st.columns(4)
    a.metric("Generating", f"{stats.generating} / {stats.max_concurrent}")
    b.metric("Queued", f"{stats.queued} / {stats.queue_size}")
    c.metric("Busy refusals, last minute", stats.refused_last_minute)
    d.metric("Rate-limited, last minute", refused["rate_limited"])
    settings = rt.settings
    limits = [
        f"at most {stats.max_concurrent} generating and {stats.queue_size} waiting",
        f"queue timeout {stats.queue_timeout:g} s",
        f"rate limit per user {settings.rate_limit or 'off'}",
        f"VRAM guard {settings.vram_guard:.0%}" + (" (holding new requests now)" if stats.vram_hold else ""),
    ]
    st.caption(
        "Limits: "
        + " · ".join(limits)
        + f" · busy refusals recorded by every process in the last minute: {refused['busy']}"
    )


def _charts(label: str, gpu: GpuStatus) -> None:
    w = WINDOWS[label]
    charts = traffic(rt.db, w)
    st.subheader(f"Traffic, last {label}")
    a, b, c, d = st.columns(4)
    a.metric("Requests", f"{charts.requests:,}")
    b.metric("Latency p50", "—" if charts.latency_p50 is None else f"{charts.latency_p50:,.0f} ms")
    c.metric("Latency p95", "—" if charts.latency_p95 is None else f"{charts.latency_p95:,.0f} ms")
    d.metric("TTFT p95", "—" if charts.ttft_p95 is None else f"{charts.ttft_p95:,.0f} ms")
    figures = traffic_figures(charts)
    for left, right in (("rate", "status"), ("latency", "ttft"), ("tokens", "agent")):
        one, two = st.columns(2)
        with one:
            st.plotly_chart(figures[left], key=f"chart_{left}", width="stretch")
        with two:
            st.plotly_chart(figures[right], key=f"chart_{right}", width="stretch")
    one, two = st.columns(2)
    with one:
        st.plotly_chart(figures["model"], key="chart_model", width="stretch")
    since = utcnow() - w.span
    queue = history(rt.db, w, ["gateway.generating", "gateway.queued"], sampler.recent(since))
    with two:
        st.plotly_chart(
            history_figure("Generating and queued", "requests", queue), key="chart_queue", width="stretch"
        )
    if gpu.available:
        names = [f"gpu{g.index}.{m}" for g in gpu.gpus for m in ("memory_pct", "utilization_pct")]
        gpu_history = history(rt.db, w, names, sampler.recent(since))
        st.plotly_chart(
            history_figure("GPU memory and utilisation", "%", gpu_history), key="chart_gpu", width="stretch"
        )


def _last_requests() -> None:
    st.subheader("Last 10 requests")
    rows = last_requests(rt.db, 10)
    if not rows:
        st.caption("No request has been recorded yet.")
        return
    st.dataframe(
        rows,
        hide_index=True,
        key="last_requests",
        column_config={
            "started_at": st.column_config.DatetimeColumn("started (UTC)", format="YYYY-MM-DD HH:mm:ss")
        },
    )


label = st.radio("Chart window", list(WINDOWS), index=1, horizontal=True, key="dashboard_window")


@st.fragment(run_every=timedelta(seconds=SAMPLE_INTERVAL_S))
def live() -> None:
    snapshot = sampler.latest()
    st.caption(f"Sampled at {snapshot.at:%H:%M:%S} UTC; refreshes every {SAMPLE_INTERVAL_S:g} s.")
    _gpus(snapshot.gpu)
    _ollama(snapshot.ollama)
    _gateway(snapshot.gateway)
    _charts(label, snapshot.gpu)
    _last_requests()


def _model_controls() -> None:
    """Load or unload a model by hand (e.g. warm the model up before a meeting, free VRAM for another one)."""
    st.subheader("Load or unload a model")
    notice = st.session_state.pop(_NOTICE, None)
    if notice:
        st.success(notice)
    backend = sampler.ollama()
    if backend is None:
        st.caption("Not available: Ollama is not used.")
        return
    try:
        installed = [m.name for m in backend.models()]
    except BackendError as exc:
        st.caption(f"Not available now: {exc.message}")
        return
    loaded = [m.name for m in sampler.latest().ollama.loaded]
    left, right = st.columns(2)
    with left.form("load_model"):
        model = st.selectbox(
            "Installed model", installed, index=None, placeholder="Choose a model", key="load_choice"
        )
        load = st.form_submit_button("Load", icon=":material/upload:")
    with right.form("unload_model"):
        unloaded = st.selectbox(
            "Loaded model", loaded, index=None, placeholder="Choose a model", key="unload_choice"
        )
        unload = st.form_submit_button("Unload", icon=":material/download:")
    if load or unload:
        name = model if load else unloaded
        if not name:
            st.warning("Choose a model first.")
            return
        try:
            with st.spinner(f"{'Loading' if load else 'Unloading'} {name}…"):
                if load:
                    sampler.load_model(identity.user.name, name)
                else:
                    sampler.unload_model(identity.user.name, name)
        except BackendError as exc:
            st.error(f"Could not {'load' if load else 'unload'} {name}: {exc.message}")
        else:
            st.session_state[_NOTICE] = f"{name} is {'loaded' if load else 'unloaded'}."
            st.rerun()


live()
_model_controls()
