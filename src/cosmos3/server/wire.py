"""Wire rules the vLLM-Omni routes share: field types, `extra_params`, `size`, the model id, and merging a
route's fields with `extra_params` into one dict of request field names for `GenerateRequest.from_dict`."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

from cosmos3.generation.dialects import dialect
from cosmos3.server.errors import APIError
from cosmos3.server.settings import Settings

SIZE_PATTERN = r"^\d+x\d+$"
# Request fields -> vLLM-Omni's names, for errors about fields the client left to their defaults.
VLLM_WIRE = {
    "num_steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "shift": "flow_shift",
    "enable_sound": "generate_sound",
    "width": "size",
    "height": "size",
}
# Request fields a client never sets through extra_params: media come as references or uploads, and the rest
# belong to the server.
SERVER_FIELDS = ("image", "video", "vision_path", "checked", "dialect", "name")


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _unicode(value: str) -> str:
    if has_surrogate(value):
        raise ValueError("contains a lone UTF-16 surrogate; send valid Unicode text")
    return value


# A string that is valid Unicode (JSON can carry "\ud800", which no tokenizer or encoder accepts).
Text = Annotated[str, AfterValidator(_unicode)]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    return value


# An integer field of a JSON body: pydantic's lax mode reads `true` as 1 (a flag sent to the wrong field would
# become a count); numbers and numeric strings keep its lax rules.
Int = Annotated[int, BeforeValidator(_not_bool)]


def find_surrogate(value: Any, where: str) -> str | None:
    """The path of the first string (or key) in a JSON value that holds a lone surrogate, or None."""
    if isinstance(value, str):
        return where if has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = find_surrogate(key, where) or find_surrogate(item, f"{where}.{key}")
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_surrogate(item, f"{where}[{i}]")
            if found:
                return found
    return None


def check_unicode(value: Any, where: str) -> None:
    found = find_surrogate(value, where)
    if found:
        raise APIError(400, f"{found} contains a lone UTF-16 surrogate; send valid Unicode text", found)


def check_model(requested: str | None, settings: Settings) -> None:
    if requested is not None and requested != settings.model_name:
        raise APIError(400, f"Model mismatch: this server serves {settings.model_name!r}, not {requested!r}", "model")


def parse_size(size: str | None) -> dict[str, int]:
    if not size:
        return {}
    width, height = (int(v) for v in size.split("x"))
    return {"width": width, "height": height}


def random_seed() -> int:
    return secrets.randbits(31)


def load_json(data: str | bytes, param: str, what: str) -> Any:
    """JSON text from a client -> its value; 400 naming `param` if it is not JSON (`what`: what it should be).
    Nesting deeper than Python's recursion limit is refused too: `json.loads` raises RecursionError there."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"{param} is not {what}: {exc}", param) from exc
    except RecursionError as exc:
        raise APIError(400, f"{param} is not {what}: nested too deeply", param) from exc


def parse_extra(extra_params: str | dict | None, extra_args: str | dict | None) -> dict[str, Any]:
    """Merge `extra_params` and `extra_args` (JSON objects, or JSON text of one); a key in both is an error."""
    merged: dict[str, Any] = {}
    for name, raw in (("extra_params", extra_params), ("extra_args", extra_args)):
        if raw is None or raw == "":
            continue
        if isinstance(raw, str):
            raw = load_json(raw, name, "valid JSON")
        if not isinstance(raw, dict):
            raise APIError(400, f"{name} must be a JSON object", name)
        check_unicode(raw, name)
        for key, value in raw.items():
            if key in merged:
                raise APIError(400, f"{key} is given in both extra_params and extra_args", f"{name}.{key}")
            merged[key] = value
    return merged


def extra_fields(
    extra: dict[str, Any],
    dialect_name: str,
    prefix: str = "extra_params.",
    media: str = "media come as input_reference, image_reference or video_reference",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Request fields a client sends by name (`extra_params`, the playground's "More fields") -> (fields under their
    canonical names, canonical name -> the name sent). What names a file on the server or belongs to it is refused
    (`media`: where media come from instead), and so are two names for one field."""
    aliases = dialect(dialect_name).aliases
    fields: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, value in extra.items():
        canonical, param = aliases.get(key, key), f"{prefix}{key}"
        if canonical in SERVER_FIELDS:
            raise APIError(400, f"{param} cannot be set by a client ({media})", param)
        if canonical in fields:
            raise APIError(400, f"{param} duplicates {names[canonical]}", param)
        fields[canonical] = value
        names[canonical] = param
    return fields, names


def merge_fields(top: dict[str, Any], extra: dict[str, Any], dialect_name: str) -> tuple[dict, dict[str, str]]:
    """A route's own fields (wire names, None left out; `size` stands for width and height) and `extra_params` keys
    -> (request fields under their canonical names, canonical name -> the name the client used). One field sent
    twice (two names, or a route field and an extra_params key) must carry one value: a disagreement is an error,
    never a silent choice."""
    aliases = dialect(dialect_name).aliases
    fields, names = extra_fields(extra, dialect_name)
    for key, value in top.items():
        if value is None:
            continue
        for canonical, item in parse_size(value).items() if key == "size" else [(aliases.get(key, key), value)]:
            if canonical in fields and fields[canonical] != item:
                raise APIError(
                    400, f"{key}={value!r} disagrees with {names[canonical]}={fields[canonical]!r}; send one", key
                )
            fields[canonical] = item
            names[canonical] = key
    return fields, names


def check_guardrails_request(engine, extra: dict[str, Any]) -> None:
    """`guardrails: true` cannot turn checks on for a server started without them: say so instead of ignoring it."""
    if extra.get("guardrails") is True and (engine.generator is None or engine.generator.guardrail is None):
        raise APIError(
            400,
            "extra_params.guardrails=true, but this server runs without guardrails "
            "(--no-guardrails or a checkpoint without a safety checker)",
            "extra_params.guardrails",
        )


def check_sequence_length(engine, prompt: str, limit: Any, param: str = "extra_params.max_sequence_length") -> None:
    """`max_sequence_length` never truncates: a longer prompt is an error that says by how much."""
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise APIError(400, f"max_sequence_length={limit!r} must be a positive integer", param)
    tokenizer = (engine.generator.parts if engine.generator is not None else engine.reasoner).tokenizer
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise APIError(400, f"prompt has {n} tokens, more than max_sequence_length={limit}", "prompt")
