"""The verify stage: did each edit happen, and only where it should (see docs/verify.md)."""
