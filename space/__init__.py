"""The Gradio app: chat with the served GGUF and flag its answers (`python -m space`)."""
