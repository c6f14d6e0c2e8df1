"""Streamlit helpers shared by app.py and the pages: the runtime, the signed-in identity, common widgets.

Kept outside the `clawdbot` package, which never imports Streamlit.
"""
