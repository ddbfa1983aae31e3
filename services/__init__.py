"""Everything that runs a model: model families, the LLM engine and the stage services."""
