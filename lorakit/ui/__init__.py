"""The web UI (``lorakit ui``): Gradio pages over the functions the CLI calls — data inspection,
a run form built from the config dataclasses, ``lorakit train`` processes watched through their
``metrics.jsonl``, run comparison, and side-by-side chat with adapters. It writes the same files a
CLI run writes, and only under the runs and data folders it was given.

``runs``, ``plan`` and ``chat`` hold the logic and import no UI library; ``app`` builds the page
(Gradio, the optional extra ``lorakit[ui]``).

May import every room below the CLI (export, planning, training, inference, base, data, config)."""
