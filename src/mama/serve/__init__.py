"""``mama serve``: a local web app over an index (search, captions) and training runs.

``mama.serve.app.serve`` starts it; ``mama.serve.backend.ServeBackend`` does the work of each request
without gradio, which only :mod:`mama.serve.app` imports, when the app starts.
"""

__all__: list[str] = []
