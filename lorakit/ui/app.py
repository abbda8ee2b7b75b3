"""Build and serve the page. ``lorakit ui`` calls ``launch``; tests call ``build_app`` and launch it
on a free port."""

from __future__ import annotations

from .handlers import CSS, UiContext

__all__ = ["build_app", "launch", "UiContext"]


def build_app(ctx: UiContext):
    """The gr.Blocks of the page."""
    import gradio as gr

    from . import tabs

    with gr.Blocks(title="lorakit") as demo:
        gr.Markdown("## lorakit — data → plan → train → chat. Every button runs what the CLI runs, into the same files.")
        with gr.Tabs():
            tabs.data_tab(gr, ctx)
            tabs.train_tab(gr, ctx)
            tabs.runs_tab(gr, ctx)
            tabs.chat_tab(gr, ctx)
    return demo


def launch(ctx: UiContext, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           block: bool = True):
    """Serve the page; returns (demo, url). ``block=False`` returns at once (tests)."""
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block,
                            quiet=True, show_error=True, css=CSS)
    return demo, url
