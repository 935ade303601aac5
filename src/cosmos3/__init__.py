"""cosmos3: a runtime for the Cosmos 3 omni world models."""

from cosmos3.engine import Engine, load
from cosmos3.errors import RequestError
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import GenerationResult

__all__ = ["Engine", "GenerateRequest", "GenerationResult", "RequestError", "load"]
__version__ = "0.1.0"
