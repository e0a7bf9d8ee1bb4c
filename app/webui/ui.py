"""The page: one tab per step of the loop (Train, Runs, Chat, Evaluate, Export), built from the tabs' modules."""

from __future__ import annotations

import gradio as gr

from app.webui import tab_chat, tab_evaluate, tab_export, tab_runs, tab_train
from app.webui.context import Context

TABS = (
    ("Train", tab_train),
    ("Runs", tab_runs),
    ("Chat", tab_chat),
    ("Evaluate", tab_evaluate),
    ("Export", tab_export),
)


def build(ctx: Context) -> gr.Blocks:
    with gr.Blocks(title="ChatGLM-CPU-Trainer") as blocks:
        gr.Markdown(
            "## ChatGLM-CPU-Trainer\nEvery button runs the `python -m app` command it shows, as its own "
            "process: closing this page or stopping the UI never stops a training run."
        )
        with gr.Tabs():
            for title, tab in TABS:
                with gr.Tab(title, id=title.lower(), elem_id=f"tab-{title.lower()}"):
                    form = tab.build(ctx)
                if form is not None:
                    ctx.forms[title.lower()] = form
    return blocks
