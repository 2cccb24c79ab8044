"""Export a build as a Hub-ready dataset (parquet shards with embedded images, a card) and
push it to the Hugging Face Hub. Heavy imports (datasets, huggingface_hub) stay inside."""
