"""General text for a forgetting check (``lorakit eval``): what a fine-tune should not change.

``GENERAL_PROMPTS`` are everyday requests far from any one fine-tuning task (facts, explanation,
writing, arithmetic, advice, code). The built-in general set is the base model's own greedy
answers to them: the base's perplexity on that text is the reference, and an adapter that
changes how the model answers ordinary questions raises it. ``general_text_examples`` turns a
plain-text file a user gives into examples scored on every token.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError, read_text

__all__ = ["GENERAL_PROMPTS", "TEXT_SUFFIXES", "general_text_examples"]

GENERAL_PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What is 17 times 3?",
    "Give me three tips for sleeping better.",
    "How does a refrigerator keep food cold?",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that returns the square of a number.",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "Suggest a name for a friendly cat.",
    "How many days are there in a leap year?",
    "Describe the water cycle briefly.",
    "What is the difference between weather and climate?",
    "Write one sentence to thank a colleague for their help.",
    "Why do we have seasons on Earth?",
    "List the primary colors.",
    "What does a CPU do in a computer?",
    "Give a simple recipe for a cup of tea.",
    "What is the largest planet in the solar system?",
    "Explain what a noun is, with an example.",
    "How can I make my passwords more secure?",
    "What is the boiling point of water at sea level?",
    "Summarise the story of Little Red Riding Hood in one sentence.",
]

# Files read as plain text (paragraphs separated by blank lines), not as records.
TEXT_SUFFIXES = (".txt", ".md")


def general_text_examples(path: str | Path) -> list[tuple[str, dict]]:
    """A plain-text file's paragraphs as text examples (scored on every token), with their place."""
    text = read_text(str(path), "general text file")
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    examples = [(f"{path}: paragraph {n}", {"text": p}) for n, p in enumerate(paragraphs, 1) if p]
    if not examples:
        raise LorakitError(f"{path}: no text in the file; give a file of ordinary text for the forgetting check")
    return examples
