"""What the page's buttons do: plain functions over ``runs``, ``plan``, ``chat`` and the data and
export functions the CLI calls; they return what the widgets show (Markdown, tables, HTML) and
turn a user's mistake into a message, never a traceback. No UI library is imported here."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import LorakitError
from .chat import MIX, ChatHub
from .plan import estimate_text, form_fields, plan_run, recommended_values
from .runs import RunManager, before_after, config_table, read_config, read_metrics

__all__ = ["UiContext", "CSS", "inspect_", "upload", "clean", "plan_", "start", "watch", "act", "compare", "ask",
           "export_", "answers_html", "configs_html", "result_table", "loss_figure", "recommended_values", "form_fields", "MIX"]

CSS = (".lk-trained{background:#c8f7c5} .lk-answers td{vertical-align:top;white-space:pre-wrap} "
       ".lk-configs{border-collapse:collapse;font-size:0.9em} .lk-configs td,.lk-configs th{padding:2px 8px;"
       "border-bottom:1px solid #ddd;text-align:left;overflow-wrap:anywhere} .lk-configs tr.lk-differs td{background:#fff0b3;"
       "font-weight:600}")


class UiContext:
    """What the page may touch: the runs folder (read/write) and the data folder (read, uploads)."""

    def __init__(self, runs_dir: str, data_dir: str, model: str) -> None:
        self.runs = RunManager(runs_dir)
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.chat = ChatHub()

    def data_path(self, text: str) -> Path:
        """A data path typed or uploaded, refused outside the data and runs folders."""
        if not text or not text.strip():
            raise LorakitError("choose a data file first")
        p = Path(text.strip())
        p = (p if p.is_absolute() else self.data_dir / p).resolve()
        if not any(p == root or root in p.parents for root in (self.data_dir, self.runs.root)):
            raise LorakitError(f"{text}: the UI reads data only under {self.data_dir} (or the runs folder)")
        if not p.exists():
            raise LorakitError(f"{text}: no such file or folder under {self.data_dir}")
        return p

    def adapters(self) -> dict[str, str]:
        """Run name -> adapter folder, for every run that has written one."""
        return {n: str(self.runs.path(n) / "adapter") for n in self.runs.names()
                if (self.runs.path(n) / "adapter" / "adapter_config.json").is_file()}

    def models(self) -> list[str]:
        """The base models to chat with: the UI's model, then every full/freeze run's model folder."""
        return [self.model, *(str(self.runs.path(n) / "model") for n in self.runs.names()
                              if (self.runs.path(n) / "model" / "config.json").is_file())]


def _error(err: object) -> str:
    return f"**error:** {err}"


# ---- Data ------------------------------------------------------------------------------------

def inspect_(ctx: UiContext, path: str, model: str, max_len: float):
    import pandas as pd

    from ..base import load_tokenizer
    from ..data.inspect import inspect_data, percentile
    from ..data.templates import resolve_template

    try:
        tok = load_tokenizer(model or ctx.model)
        report = inspect_data(str(ctx.data_path(path)), tok, resolve_template("auto", tok))
    except (LorakitError, OSError) as err:
        return _error(err), [], pd.DataFrame({"tokens": [], "examples": []})
    lengths, limit = report.lengths, int(max_len)
    over = report.over(limit)
    summary = (f"**format:** {report.format} (fields: {', '.join(report.fields)}) · **records:** {report.records:,}"
               + (f" (lengths from a sample of {len(lengths):,})" if report.sampled else "") + " · "
               f"**tokens per example:** p50 {percentile(lengths, 50)}, p95 {percentile(lengths, 95)}, max {max(lengths)} · "
               f"**longer than max_len={limit}:** {over} ({100 * over / len(lengths):.1f}%, truncated)")
    spans: list[tuple[str, str | None]] = []
    for i in range(min(3, len(lengths))):
        spans.append((f"\n— {report.wheres[i]} —\n", None))
        spans += [(text, "trained" if trained else None) for text, trained in report.segments(i, tok)]
    step = max(1, (max(lengths) + 19) // 20)
    bins = pd.Series([n // step * step for n in lengths]).value_counts().sort_index()
    hist = pd.DataFrame({"tokens": [str(b) for b in bins.index], "examples": bins.values})
    return summary, spans, hist


def upload(ctx: UiContext, files: list | None) -> str:
    if not files:
        return ""
    folder = ctx.data_dir / "uploads"
    folder.mkdir(exist_ok=True)
    names = []
    for f in files:
        src = Path(getattr(f, "name", f))
        shutil.copy(src, folder / src.name)
        names.append(f"uploads/{src.name}")
    return names[0] if len(names) == 1 else "uploads"


def clean(ctx: UiContext, folder: str) -> str:
    from ..data.clean import clean_corpus

    try:
        src = ctx.data_path(folder)
        out = ctx.data_dir / f"{src.name}.clean.jsonl"
        report = clean_corpus([str(src)], out)
    except (LorakitError, OSError) as err:
        return _error(err)
    return f"wrote `{out.relative_to(ctx.data_dir)}`\n\n```\n{report.format()}\n```"


# ---- Train -----------------------------------------------------------------------------------

def plan_(ctx: UiContext, name: str, keys: list[str], values: tuple) -> tuple[str, str, str]:
    form = dict(zip(keys, values))
    if form.get("data.path"):
        try:
            form["data.path"] = str(ctx.data_path(form["data.path"]))
        except LorakitError as err:
            return "", "", _error(err)
    plan = plan_run(form, str(ctx.runs.root / (name or "NAME")))
    if plan.error:
        return plan.command, "", _error(plan.error)
    try:
        estimate = estimate_text(plan.config)
    except (LorakitError, OSError, ValueError) as err:
        estimate = f"(no estimate: {err})"
    return plan.command, plan.yaml, f"```\n{estimate}\n```"


def start(ctx: UiContext, name: str, keys: list[str], values: tuple) -> str:
    form = dict(zip(keys, values))
    try:
        form["data.path"] = str(ctx.data_path(form.get("data.path", "")))
        plan = plan_run(form, str(ctx.runs.path(name)))
        if plan.error:
            raise LorakitError(plan.error)
        ctx.runs.start(name, plan.flags)
    except LorakitError as err:
        return _error(err)
    return f"started `{name}`: `{plan.command}`"


def result_table(metrics: list[dict]):
    """The finished run's before/after table (the CLI's, from metrics.jsonl); empty before it ends."""
    import pandas as pd

    from ..training.model_card import SCORE_ROWS

    scores = before_after(metrics)
    if scores is None:
        return pd.DataFrame({"held-out": []})
    before, after = scores
    show = lambda d, k, f: f.format(d[k]) if isinstance(d.get(k), (int, float)) else "–"  # noqa: E731
    rows = [(label, show(before, k, f), show(after, k, f)) for label, k, f in SCORE_ROWS if k in before or k in after]
    return pd.DataFrame(rows, columns=["held-out", before["model"], f"{after['model']} (step {after['step']})"])


def _empty_plot():
    import pandas as pd

    return pd.DataFrame({"step": [], "value": [], "series": []})


def watch(ctx: UiContext, name: str):
    import pandas as pd

    if not name:
        return "no run selected", _empty_plot(), "", result_table([])
    try:
        st = ctx.runs.status(name)
    except LorakitError as err:
        return _error(err), _empty_plot(), "", result_table([])
    metrics = read_metrics(ctx.runs.path(name))
    rows = [(m["step"], m["loss"], "train loss") for m in metrics if "loss" in m]
    rows += [(m["step"], m["eval_loss"], "eval loss") for m in metrics if "eval_loss" in m]
    total = f"/{st.max_steps}" if st.max_steps else ""
    loss = f" · loss {st.loss:.4f}" if st.loss is not None else ""
    ev = f" · eval loss {st.eval_loss:.4f}" if st.eval_loss is not None else ""
    text = (f"**{name}**: {st.state} · step {st.step}{total}{loss}{ev} · "
            f"<span id='lk-points'>{sum(1 for r in rows if r[2] == 'train loss')}</span> loss points")
    plot = pd.DataFrame(rows, columns=["step", "value", "series"])
    return text, plot, ctx.runs.log_tail(name), result_table(metrics)


def act(ctx: UiContext, name: str, action: str) -> str:
    try:
        getattr(ctx.runs, action)(name)
    except LorakitError as err:
        return _error(err)
    return {"stop": f"stopping `{name}` (it writes a checkpoint first)", "resume": f"resuming `{name}`"}[action]


# ---- Runs ------------------------------------------------------------------------------------

def configs_html(configs: dict[str, dict], only_differences: bool = False) -> str:
    """The runs' configs side by side, one column per run; the options they differ on highlighted."""
    import html

    if not configs:
        return "<p>choose runs to compare</p>"
    rows = [r for r in config_table(configs) if r[2] or not only_differences]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in configs)
    body = "".join(f"<tr class='{'lk-differs' if differs else 'lk-same'}'><td>{html.escape(key)}</td>"
                   + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"
                   for key, values, differs in rows)
    n = sum(1 for r in rows if r[2])
    note = (f"<p>{n} option(s) differ (highlighted)</p>" if len(configs) > 1 else "<p>one run: choose another to compare</p>")
    return f"{note}<table class='lk-configs'><tr><th>option</th>{head}</tr>{body}</table>"


def loss_figure(curves):
    """The compared runs' curves as one matplotlib figure: a colour per run, train loss solid and eval
    loss dashed with points (drawn whole each time: the set of runs changes with every choice)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    for series, part in curves.groupby("run", sort=False):
        run, kind = series.rsplit(" · ", 1)
        color = colors.setdefault(run, f"C{len(colors) % 10}")
        style = dict(linestyle="--", marker="o") if kind == "eval" else {}
        ax.plot(part["step"], part["loss"], color=color, label=series, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if colors:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def compare(ctx: UiContext, names: list[str], only_differences: bool = False):
    """Loss and eval curves of the chosen runs overlaid, their final scores, and their configs side by side."""
    import pandas as pd

    rows, configs, scores = [], {}, []
    for n in names or []:
        metrics = read_metrics(ctx.runs.path(n))
        rows += [(m["step"], m["loss"], f"{n} · train") for m in metrics if "loss" in m]
        rows += [(m["step"], m["eval_loss"], f"{n} · eval") for m in metrics if "eval_loss" in m]  # from step 0
        configs[n] = read_config(ctx.runs.path(n))
        table = result_table(metrics)
        if len(table):
            scores += [(n, *row) for row in table.itertuples(index=False, name=None)]
    result = pd.DataFrame(scores, columns=["run", "held-out", "before", "after"]) if scores else \
        pd.DataFrame({"run": [], "held-out": []})
    return pd.DataFrame(rows, columns=["step", "loss", "run"]), result, configs_html(configs, only_differences)


# ---- Chat ------------------------------------------------------------------------------------

def answers_html(texts: dict[str, str]) -> str:
    import html

    head = "".join(f"<th>{html.escape(k)}</th>" for k in texts)
    cells = "".join(f"<td class='lk-answer' data-column='{html.escape(k)}'>{html.escape(v)}</td>" for k, v in texts.items())
    return f"<table class='lk-answers'><tr>{head}</tr><tr>{cells}</tr></table>"


def ask(ctx: UiContext, model: str, chosen: list[str], question: str, max_new: float, use_mix: bool,
         mix_a: str | None, mix_b: str | None, weight: float):
    available = ctx.adapters()
    adapters = {n: available[n] for n in chosen or [] if n in available}
    mix = None
    if use_mix:
        if mix_a not in adapters or mix_b not in adapters or mix_a == mix_b:
            yield _error("the mix needs two different adapters that are also chosen above")
            return
        mix = (mix_a, mix_b, float(weight))
    try:
        for texts in ctx.chat.answers(model or ctx.model, adapters, question, int(max_new), mix):
            yield answers_html(texts)
    except LorakitError as err:
        yield _error(err)


def export_(ctx: UiContext, name: str | None, target: str) -> str:
    from ..export import export

    if not name:
        return _error("choose one run")
    try:
        result = export(str(ctx.runs.path(name)), target)
    except LorakitError as err:
        return _error(err)
    return f"wrote `{result.path}`\n\n" + "\n".join(f"    {line}" for line in result.lines)
