"""``lorakit train``: the loop (``loop``), its setup steps, the optimizer and schedule (``optim``),
evaluation (``evaluate``), checkpoints and exact resume (``checkpoint``), what a run shows and
writes (``runlog``), rank schedules (``rank_schedule``), data parallelism (``distributed``) and
the adapter's model card (``model_card``).

May import: everything below it — ``core``, ``ops``, ``quant``, ``data``, ``base``,
``inference`` (generation, for evaluation), ``config``. Never planning or the CLI."""
