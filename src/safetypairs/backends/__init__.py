"""Model backends (instructors, editors, judges/guards, encoders) behind the registrys spec strings."""
