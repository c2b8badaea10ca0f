"""AUTOMATIC1111's HTTP API (and the ControlNet extension's) beside the Gradio app: `python app.py` serves both."""
