"""Planning a run before it starts: the memory estimate from a model's config (``estimate``) and
a config recommended from the data (``recommend``).

May import: ``lorakit.base`` (model sources, precision), ``lorakit.data``, ``lorakit.config``,
``lorakit.errors``. Never training, inference or the CLI."""
