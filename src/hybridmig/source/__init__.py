"""The source side: the migration driver, pre-copy rounds, the dirty
tracker and auto-converge."""
