"""The interactive page (app.py): `logic` holds everything that does not need gradio (loading, sampling, edits,
upload checks, brush masks); `ui` builds the gradio page on it and is imported by app.py only."""
