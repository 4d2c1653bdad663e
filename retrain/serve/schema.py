"""The OpenAPI spec (/openapi.json): request bodies, error answers and response schemas.

The handlers return plain dicts (no per-request validation); these schemas only document them.
"""

from __future__ import annotations

from retrain.serve.config import MAX_BATCH_IMAGES

BINARY = {"type": "string", "format": "binary"}
ERROR_ANSWERS = ((400, "empty or malformed body"), (401, "missing or wrong API key"),
                 (413, "body over the size limit, or too many pixels (per image or per request)"),
                 (415, "a Content-Type that is not an image or multipart"),
                 (408, "the body arrived too slowly"),
                 (422, "not a readable image, or a bad parameter"),
                 (503, "too busy: too many requests or pixels in flight; see Retry-After"))


def spec(body: dict, ok_schema: str) -> dict:
    """An endpoint's openapi_extra: its request body, the 200 schema and every error answer."""
    err_schema = {"$ref": "#/components/schemas/Error"}
    errors_doc = {str(s): {"description": d, "content": {"application/json": {"schema": err_schema}}}
                  for s, d in ERROR_ANSWERS}
    return {"requestBody": {"required": True, "content": body},
            "responses": {"200": {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{ok_schema}"}}}}, **errors_doc}}


def single_spec() -> dict:
    """POST /v1/classify: the raw image, or multipart field `file`."""
    return spec({"multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY},
                                                    "required": ["file"]}},
                 "image/jpeg": {"schema": BINARY}, "image/png": {"schema": BINARY},
                 "application/octet-stream": {"schema": BINARY}}, "Classification")


def batch_spec() -> dict:
    """POST /v1/classify/batch: multipart fields `files`."""
    return spec({"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": BINARY, "minItems": 1,
                                 "maxItems": MAX_BATCH_IMAGES}}}}}, "BatchClassification")


def response_schemas() -> dict:
    pred = {"type": "object", "required": ["label", "score"],
            "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
    err = {"type": "object", "required": ["code", "message"],
           "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}
    result = {"type": "object", "required": ["model_id", "label", "predictions", "novelty", "unknown", "time_ms"],
              "properties": {"filename": {"type": "string"}, "model_id": {"type": "string"},
                             "label": {"type": "string", "description": "top label, or 'unknown' when "
                                       "the novelty is above the model's novelty_threshold or the top score "
                                       "below its unknown_threshold"},
                             "predictions": {"type": "array", "items": pred, "description": "the best "
                                             "classes and their scores, also when the label is 'unknown'"},
                             "novelty": {"type": ["number", "null"], "description": "how unlike the "
                                         "training photos the image is (the model's novelty output; null "
                                         "for a model without one)"},
                             "unknown": {"type": "boolean", "description": "whether the label is 'unknown'"},
                             "batch_size": {"type": "integer", "description": "images in the model call "
                                            "this one shared (micro-batching)"},
                             "time_ms": {"type": "object", "additionalProperties": {"type": "number"}}}}
    return {
        "Prediction": pred,
        "Classification": result,
        "BatchClassification": {"type": "object", "required": ["model_id", "results"], "properties": {
            "model_id": {"type": "string"},
            "results": {"type": "array", "items": {"anyOf": [
                {"$ref": "#/components/schemas/Classification"},
                {"type": "object", "required": ["filename", "error"],
                 "properties": {"filename": {"type": "string"}, "error": err}}]}}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": err}},
    }


def install_openapi(app) -> None:
    """Replace app.openapi with one that adds our schemas and documents our 422 shape."""
    from fastapi.openapi.utils import get_openapi

    schemas = response_schemas()

    def openapi():
        if app.openapi_schema is None:
            s = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            s.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            # FastAPI documents its own 422 shape; ours is the Error schema.
            for path in s.get("paths", {}).values():
                for op in path.values():
                    r = op.get("responses", {})
                    if "422" in r:
                        r["422"] = {"description": "not a readable image, or a bad parameter",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for k in ("HTTPValidationError", "ValidationError"):
                s["components"]["schemas"].pop(k, None)
            app.openapi_schema = s
        return app.openapi_schema

    app.openapi = openapi
