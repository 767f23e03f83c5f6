"""engine: the public `Engine` (from_pretrained, generate) and batch jobs over it. May import:
runtime and every floor below it (not planning)."""
