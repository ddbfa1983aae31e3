"""Torch-free pieces every process needs."""
