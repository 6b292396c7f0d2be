"""The FastAPI application: capture, insights, health. `uvicorn serving.app:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from confluent_kafka import Consumer
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.settings import Settings
from serving import capture, health, insights, saved
from serving.compute import Computations
from serving.errors import (
    ERROR_RESPONSES,
    JSON,
    JSON_BODY,
    ApiError,
    ServerErrors,
    api_error_handler,
    http_error_handler,
    request_validation_handler,
)
from state.archive import Archive
from state.connection import connect
from state.registry import DefinitionRegistry, ProjectCache, Registry
from state.stream import Stream
from state.topics import TopicIdentity


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(settings.redis_url)
        app.state.settings = settings
        app.state.archive = Archive(settings.archive_dir) if settings.archive_dir else None  # read only
        app.state.computations = Computations(settings.redis_url, settings.query_workers, settings.query_timeout_s,
                                              settings.summary_cache_mb)
        app.state.redis = client
        app.state.registry = Registry(client)
        app.state.definitions = DefinitionRegistry(client)
        app.state.projects = ProjectCache(app.state.registry)
        app.state.stream = Stream(client, settings.topic)
        app.state.offsets = capture.AcknowledgedOffsets(app.state.stream)
        app.state.draining = False
        app.state.producer = capture.EventProducer(settings.kafka_bootstrap, settings.topic)

        loop = asyncio.get_running_loop()

        def drain(*_: object) -> None:  # `insightflow up` is stopping: accept no more events
            app.state.draining = True
            loop.call_soon_threadsafe(logging.getLogger("insightflow.api").info,
                                      "draining: capture answers 503 from now on")

        # A plain handler, not the event loop's: the loop learns of its signals through its self-pipe,
        # which drops them when full, and a signal lost here would leave capture accepting all through
        # the stop. A plain handler runs on the main thread at its next bytecode whatever the pipe holds.
        signal.signal(signal.SIGUSR1, drain)
        app.state.topic = TopicIdentity(settings.kafka_bootstrap, settings.topic)
        app.state.watermarks = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                         "group.id": "insightflow-readyz", "enable.auto.commit": False})
        yield
        app.state.computations.close()
        app.state.watermarks.close()
        app.state.producer.close()
        app.state.offsets.close()
        client.close()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = FastAPI(title="Insightflow", version="0.1.0", lifespan=lifespan, default_response_class=JSON)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_middleware(ServerErrors)
    for router in (capture.router, insights.router, saved.router, health.router):
        for route in router.routes:
            methods = getattr(route, "methods", set()) or set()
            if methods & {"POST", "PATCH", "PUT"} and hasattr(route, "openapi_extra"):
                route.openapi_extra = {**JSON_BODY, **(route.openapi_extra or {})}
        app.include_router(router, responses=ERROR_RESPONSES)
    return app
