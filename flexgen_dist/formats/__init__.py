"""formats: what users hand in and get back: prompt files, batch requests (OpenAI batch or simple
JSONL), output records, and crash-safe output files. May import: system, core."""
