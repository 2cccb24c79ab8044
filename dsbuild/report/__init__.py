"""Reports over a build's records (diversity of caption text; see docs/diversity.md)."""
