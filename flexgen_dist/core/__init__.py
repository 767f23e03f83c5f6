"""core: what every floor shares and nothing else: the error type users see, small shared types
(Tier, GiB, dtypes by name), the typed configurations behind the CLI, API and `configs/`, and the
Policy as data. May import: nothing of this package."""
