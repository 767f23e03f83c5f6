"""cli: the command lines (`run`, `plan`): flags generated from the typed configurations, the job
report. May import: every floor."""
