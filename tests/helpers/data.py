"""Small training and calibration records in Alpaca format, written for the tiny model's vocabulary."""

from __future__ import annotations

QA_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Hello! How are you today?", "I am fine, thank you."),
    ("What jumps over the lazy dog?", "The quick brown fox."),
    ("When do tokens exit early?", "Tokens exit early when the model is confident."),
]


def alpaca_records(n: int = 16) -> list[dict]:
    out = []
    for i in range(n):
        q, a = QA_PAIRS[i % len(QA_PAIRS)]
        out.append({"instruction": q, "input": "" if i % 3 else "Sorted fine-tuning", "output": a})
    return out


CALIBRATION_RECORDS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Say hello.", "input": "", "output": "Hello! How are you today?"},
    {"instruction": "Describe a fox.", "input": "", "output": "The quick brown fox jumps over the lazy dog."},
    {"instruction": "Translate", "input": "Tokens exit early.", "output": "Tokens exit early when confident."},
] * 3
