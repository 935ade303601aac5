"""Liveness and discovery: `GET /health` (never waits for anything) and `GET /v1/models`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from cosmos3.server.state import state

router = APIRouter()


class Health(BaseModel):
    status: Literal["healthy"] = "healthy"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cosmos3"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/health", response_model=Health)
@router.head("/health", operation_id="health_head", response_model=Health)  # HEAD: some health checkers send it
async def health() -> Health:
    return Health()


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    server = state(request)
    return ModelList(data=[ModelCard(id=server.settings.model_name, root=str(server.engine.path))])
