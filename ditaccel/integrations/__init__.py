"""Integrations of ditaccel into other runtimes (ComfyUI)."""
