"""The built-in generators of the generate stage, one package each (see dsbuild.core.generators)."""
