"""`morph serve`: an OpenAI-compatible HTTP server with per-request steering.

app.py (routes, SSE, auth, limits), params.py (request fields, checked), scheduler.py
(fair FIFO over the engine), requestlog.py (history db), run.py (uvicorn, signals, bind).
"""
