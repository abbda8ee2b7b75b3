"""The LoRA core: the adapter layers (Linear, GPT-2 Conv1D, Embedding, Conv2d), injection from a
type table, the ``LoraModel`` wrapper (many named adapters, switching, mixed batches), PEFT's
on-disk format, merge/unmerge/unload and weighted combination.

May import: torch, safetensors, transformers (layer types only), ``lorakit.config``,
``lorakit.errors``, ``lorakit.atomic``. Never quantization, training, inference or the CLI:
anything above plugs into the core (e.g. a quantized base layer is wrapped like any other)."""
