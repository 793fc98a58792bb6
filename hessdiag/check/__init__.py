"""The periodic curvature check: the probe, what each check starts from, its quantities, its record and its schedule."""
