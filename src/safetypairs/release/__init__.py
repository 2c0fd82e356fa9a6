"""Release: validated candidates to the hub layout (configs, card, raw layout, push and load)."""
