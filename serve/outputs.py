"""What a chat request may ask of its answers' form beyond text: JSON (`response_format`), and tools (refused, with
the reason). Checked before generation, so that a bad schema is a 400 that names it, not an engine failure."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from api.protocol import ChatCompletionRequest, JsonObjectFormat, JsonSchemaFormat
from serve.engine import JsonOutput

SCHEMA_PARAM = "response_format.json_schema.schema"


def json_output(request: ChatCompletionRequest) -> JsonOutput | None:
    """The engine's JSON constraint for `response_format`; None for plain text."""
    form = request.response_format
    if isinstance(form, JsonObjectFormat):
        return JsonOutput()
    if not isinstance(form, JsonSchemaFormat):
        return None
    schema = form.json_schema.json_schema
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "its top level"
        raise ApiError(400, f"the JSON schema is not valid at {where}: {exc.message}", SCHEMA_PARAM) from exc
    return JsonOutput(schema)


def refuse_tools(request: ChatCompletionRequest, tokenizer: Any) -> None:
    """Tool calls are not served: say why, in words the client can act on. `tool_choice: "none"` asks for none."""
    if not request.tools and request.tool_choice in (None, "none"):
        return
    template = str(getattr(tokenizer, "chat_template", None) or "")
    why = (
        "the served model's chat template has no tool-calling format, so tools cannot be offered to it"
        if "tools" not in template
        else "rankloop does not parse tool calls from answers"
    )
    raise ApiError(400, f"{why}: leave out `tools` and `tool_choice`", "tools" if request.tools else "tool_choice")
