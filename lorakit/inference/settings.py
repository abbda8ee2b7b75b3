"""The server's settings, apart from ``lorakit.inference.server`` so that the command line can show their
defaults in ``--help`` without importing torch."""

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass
class ServeSettings:
    api_key: str | None = None
    adapters_dir: str | None = None
    max_batch: int = 16
    batch_window_s: float = 0.01
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
