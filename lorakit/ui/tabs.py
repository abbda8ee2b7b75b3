"""The four tabs of the page, laid out with Gradio and wired to ``handlers``. Element ids
(``elem_id``) are stable: the browser test and screenshots find widgets by them."""

from __future__ import annotations

from functools import partial

from ..export import TARGETS
from . import handlers as h
from .handlers import UiContext

__all__ = ["data_tab", "train_tab", "runs_tab", "chat_tab"]


def data_tab(gr, ctx: UiContext) -> None:
    with gr.Tab("Data", id="data"):
        gr.Markdown(f"Data files are read under `{ctx.data_dir}`; uploads go to its `uploads/`.")
        with gr.Row():
            path = gr.Textbox(label="data file or folder", placeholder="train.jsonl", elem_id="lk-data-path", scale=3)
            model = gr.Textbox(label="tokenizer of", value=ctx.model, elem_id="lk-data-model", scale=2)
            max_len = gr.Number(label="max_len", value=1024, precision=0, elem_id="lk-data-maxlen", scale=1)
        upload = gr.File(label="or upload files", file_count="multiple", elem_id="lk-upload")
        go = gr.Button("Inspect", variant="primary", elem_id="lk-inspect")
        summary = gr.Markdown(elem_id="lk-data-summary")
        shown = gr.HighlightedText(label="first examples through the chat template (trained tokens highlighted)",
                                   color_map={"trained": "green"}, elem_id="lk-examples")
        hist = gr.BarPlot(x="tokens", y="examples", label="tokens per example", elem_id="lk-hist")
        with gr.Accordion("Clean a folder of documents (PDF, Word, HTML, code) into training text", open=False):
            folder = gr.Textbox(label="folder under the data folder", elem_id="lk-clean-path")
            clean = gr.Button("Clean", elem_id="lk-clean")
            cleaned = gr.Markdown(elem_id="lk-clean-report")
        upload.upload(partial(h.upload, ctx), upload, path)
        go.click(partial(h.inspect_, ctx), [path, model, max_len], [summary, shown, hist])
        clean.click(partial(h.clean, ctx), folder, cleaned)


def train_tab(gr, ctx: UiContext) -> None:
    fields = h.form_fields()
    keys = [f.key for f in fields]
    with gr.Tab("Train", id="train"):
        with gr.Row():
            name = gr.Textbox(label="run name (a folder in the runs folder)", value="run1", elem_id="lk-run-name")
            recommend = gr.Button("Recommend from the data", elem_id="lk-recommend")
        inputs = []
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                for f in fields:
                    eid = "lk-f-" + f.key.replace(".", "-").replace("_", "-")
                    if f.kind == "bool":
                        inputs.append(gr.Checkbox(label=f.key, value=f.default, info=f.help, elem_id=eid))
                    else:
                        value = ctx.model if f.key == "model.name" else ("" if f.default is None else str(f.default))
                        inputs.append(gr.Textbox(label=f.key, value=value, info=f.help, elem_id=eid, max_lines=1))
            with gr.Column(scale=2):
                error = gr.Markdown(elem_id="lk-plan")  # the memory estimate, or what is wrong with the form
                command = gr.Code(label="the same run from the command line", language="shell", elem_id="lk-command")
                yaml = gr.Code(label="as a config file (lorakit train --config FILE)", language="yaml", elem_id="lk-yaml")
                why = gr.Markdown(elem_id="lk-recommend-why")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="lk-start")
            stop = gr.Button("Stop (checkpoint)", elem_id="lk-stop")
            resume = gr.Button("Resume", elem_id="lk-resume")
        said = gr.Markdown(elem_id="lk-said")
        status = gr.Markdown(elem_id="lk-status")
        plot = gr.LinePlot(x="step", y="value", color="series", label="loss", elem_id="lk-loss-plot")
        result = gr.Dataframe(label="held-out scores before and after (when the run has finished)", elem_id="lk-result")
        log = gr.Textbox(label="output", lines=6, max_lines=12, elem_id="lk-log")
        planned = partial(h.plan_, ctx)
        for widget in [name, *inputs]:
            widget.change(lambda n, *v: planned(n, keys, v), [name, *inputs], [command, yaml, error])
        recommend.click(partial(_recommend, ctx, keys), [inputs[keys.index("model.name")], inputs[keys.index("data.path")]],
                        [*inputs, why])
        start.click(lambda n, *v: h.start(ctx, n, keys, v), [name, *inputs], said)
        stop.click(lambda n: h.act(ctx, n, "stop"), name, said)
        resume.click(lambda n: h.act(ctx, n, "resume"), name, said)
        gr.Timer(1.0).tick(partial(h.watch, ctx), name, [status, plot, log, result])


def _recommend(ctx: UiContext, keys: list[str], model: str, data: str):
    try:
        values, why = h.recommended_values(model or ctx.model, str(ctx.data_path(data)))
    except Exception as err:  # noqa: BLE001 - shown to the user, the form is left as it was
        return [*([None] * len(keys)), f"**error:** {err}"]
    values["data.path"] = data
    return [*(values[k] for k in keys), f"```\n{why}\n```"]


def runs_tab(gr, ctx: UiContext) -> None:
    with gr.Tab("Runs", id="runs"):
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="lk-runs-refresh")
            only = gr.Checkbox(label="only the options that differ", elem_id="lk-runs-only")
        chosen = gr.CheckboxGroup(label="runs", choices=ctx.runs.names(), elem_id="lk-runs")
        curves = gr.Plot(label="train and eval loss", elem_id="lk-runs-plot")
        scores = gr.Dataframe(label="held-out scores before and after", elem_id="lk-runs-scores")
        configs = gr.HTML(elem_id="lk-runs-configs")
        refresh.click(lambda: gr.CheckboxGroup(choices=ctx.runs.names()), None, chosen)

        def compare(names, only_differences):
            rows, table, html = h.compare(ctx, names, only_differences)
            return h.loss_figure(rows), table, html

        for widget in (chosen, only):
            widget.change(compare, [chosen, only], [curves, scores, configs])


def chat_tab(gr, ctx: UiContext) -> None:
    with gr.Tab("Chat", id="chat"):
        with gr.Row():
            model = gr.Dropdown(ctx.models(), value=ctx.model, allow_custom_value=True, elem_id="lk-chat-model",
                                label="base model (or a full/freeze run's model folder; any id or path)")
            refresh = gr.Button("Refresh runs", elem_id="lk-chat-refresh")
        chosen = gr.CheckboxGroup(label="adapters (runs that wrote one)", choices=list(ctx.adapters()), elem_id="lk-chat-adapters")
        with gr.Accordion("Weighted mix of two adapters (in memory; nothing is written)", open=False):
            with gr.Row():
                use_mix = gr.Checkbox(label="answer with the mix too", elem_id="lk-mix-on")
                mix_a = gr.Dropdown(label="adapter A", choices=list(ctx.adapters()), elem_id="lk-mix-a")
                mix_b = gr.Dropdown(label="adapter B", choices=list(ctx.adapters()), elem_id="lk-mix-b")
                weight = gr.Slider(0, 1, value=0.5, step=0.05, label="weight of A (B gets 1 − weight)", elem_id="lk-mix-w")
        question = gr.Textbox(label="ask", elem_id="lk-question")
        max_new = gr.Slider(1, 256, value=48, step=1, label="new tokens at most", elem_id="lk-max-new")
        ask = gr.Button("Ask", variant="primary", elem_id="lk-ask")
        answers = gr.HTML(elem_id="lk-answers")
        with gr.Row():
            target = gr.Dropdown(list(TARGETS), value="gguf-lora", label="export the first chosen run to (transformers: "
                                 "the merged model's folder)",
                                 elem_id="lk-export-to")
            export = gr.Button("Export", elem_id="lk-export")
        exported = gr.Markdown(elem_id="lk-exported")

        def adapters_now():
            names = list(ctx.adapters())
            return (gr.CheckboxGroup(choices=names), gr.Dropdown(choices=names), gr.Dropdown(choices=names),
                    gr.Dropdown(choices=ctx.models()))

        refresh.click(adapters_now, None, [chosen, mix_a, mix_b, model])
        ask.click(partial(h.ask, ctx), [model, chosen, question, max_new, use_mix, mix_a, mix_b, weight], answers)
        export.click(lambda names, t: h.export_(ctx, (names or [None])[0], t), [chosen, target], exported)
