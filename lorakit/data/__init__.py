"""Training data: reading files, formats, chat templates and label masks, packing, the demo task."""
