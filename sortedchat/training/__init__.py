"""Sorted Fine-Tuning and the paper's baselines (`sortedchat train`), and per-exit evaluation (`sortedchat eval`).

- `recipe`: every option of a run, TOML recipes, validation.
- `data`: Alpaca / chat / QA records from files or `datasets`, with file-and-line errors.
- `templates`: chat or Alpaca prompts, response-only labels, seeded batches.
- `objectives`: SoFT / SFT / ICT losses, heads applied chunk-wise at response positions only.
- `trainer`, `checkpoints`, `export`, `progress`: the accelerate training loop and what it writes.
- `evaluate`: per-exit CE, perplexity, top-1, agreement and closed-book exact match.
"""
