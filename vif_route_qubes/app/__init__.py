"""The only code that sequences an event: inputs, lock, facts, plan, apply, report."""
