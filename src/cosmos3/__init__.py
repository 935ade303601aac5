"""cosmos3: a runtime for the Cosmos 3 omni world models."""

from cosmos3.engine import Engine, load
from cosmos3.generator import GenerationResult
from cosmos3.request import GenerateRequest, RequestError

__all__ = ["Engine", "GenerateRequest", "GenerationResult", "RequestError", "load"]
__version__ = "0.1.0"
