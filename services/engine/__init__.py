"""The LLM engine shared by prefill and decode."""
