"""The captions stage: LLM agents (or the offline template backend) write caption triples."""
