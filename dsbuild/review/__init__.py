"""Review: FiftyOne inspection (``dsbuild inspect``) and Label Studio (``dsbuild review``)."""
