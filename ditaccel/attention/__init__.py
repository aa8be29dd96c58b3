"""Attention: dispatch of the core attention of a model's attention layers, references, backends."""
