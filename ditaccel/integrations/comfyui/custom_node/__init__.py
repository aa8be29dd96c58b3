# ComfyUI custom-node entry for ditaccel. Copy this file to
#     ComfyUI/custom_nodes/ditaccel_nodes/__init__.py
# (after `pip install ditaccel[comfyui]` in ComfyUI's Python environment) and restart ComfyUI.
from ditaccel.integrations.comfyui import comfy_entrypoint  # noqa: F401
