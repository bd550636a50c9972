"""Data: sources -> decoded images -> transforms -> loaders, with bad-file accounting."""
