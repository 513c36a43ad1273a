"""Pure functions over result dicts: metrics (one table of names and directions), statistics, the report,
the comparison and the model card."""
