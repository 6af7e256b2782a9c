"""A threaded Flask service that records treasure-hunt events through a background engine.

    TREASURE_ENGINE_CONFIG=engine.toml flask --app examples.flask_app run --with-threads

`Engine.background` runs the engine's event loop in a daemon thread; `submit` is the Rust method itself, safe
from every request thread, and never blocks on Kinesis.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from flask import Flask, jsonify, request

from treasure_engine import BufferFull, Engine, EngineConfig


def create_app() -> Flask:
    app = Flask(__name__)
    engine = Engine.background(EngineConfig.from_toml(os.environ.get("TREASURE_ENGINE_CONFIG", "engine.toml")))
    atexit.register(engine.stop)  # flush what was accepted when the process exits
    app.extensions["treasure_engine"] = engine

    @app.post("/hunt")
    def hunt() -> Any:
        body = request.get_data()
        doc = request.get_json(silent=True)
        if not isinstance(doc, dict) or "hunter" not in doc:
            return jsonify(error="expected a JSON object with a hunter"), 400
        try:
            engine.submit(body, str(doc["hunter"]))
        except BufferFull:
            return jsonify(error="busy, retry later"), 503
        return jsonify(accepted=True), 202

    @app.get("/stats")
    def stats() -> Any:
        return jsonify(engine.stats())

    return app
