"""Localized edits: the referred object, its mask, and attention regularisation at edit time."""
