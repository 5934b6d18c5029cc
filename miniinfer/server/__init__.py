"""OpenAI-compatible HTTP serving: ``api_server`` (the FastAPI app and ``run_server``),
``serving`` (the request lifecycle shared by the two generation routes) with
``serving_chat`` and ``serving_completion``, ``middleware`` (API key and body limit),
``async_engine.AsyncEngine`` (the thread that owns the engine), pydantic ``protocol`` models,
Prometheus ``metrics`` and the ``static/`` playground + dashboard page."""
