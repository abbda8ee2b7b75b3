"""Quantized bases for QLoRA: bitsandbytes NF4/FP4/int8 layers (``bnb``), GPTQ error-compensating
rounding (``gptq``), EoRA's initial correction (``eora``) and the saved 4-bit base of a GPTQ run
(``saved_base``). bitsandbytes is imported only where it is needed, with an install hint.

May import: ``lorakit.core``, ``lorakit.ops``, ``lorakit.config``, ``lorakit.errors``,
``lorakit.atomic``. Never training, inference or the CLI."""
