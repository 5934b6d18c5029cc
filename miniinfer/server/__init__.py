"""OpenAI-compatible HTTP serving: ``api_server.run_server`` (FastAPI + uvicorn), the
thread-owning ``async_engine.AsyncEngine``, pydantic ``protocol`` models, Prometheus
``metrics`` and the ``static/`` playground + dashboard page."""
