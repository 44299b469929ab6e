"""OpenAI-compatible HTTP serving of llmkit models (`llmkit serve`): see docs/serve.md.

`create_app(ServeConfig)` builds the FastAPI app; `serve(config)` runs it with uvicorn. Imported lazily so
that `llmkit.serve.deploy` and the CLI do not load torch/fastapi until a server is built.
"""

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name):
    if name in __all__:
        from llmkit.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'llmkit.serve' has no attribute {name!r}")
