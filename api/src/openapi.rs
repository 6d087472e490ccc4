//! The API's OpenAPI 3.0 document, written out by hand next to the handlers it describes (a
//! derive-based generator would add a proc-macro framework for five operations); the
//! schema-driven test (`cli/tests/api.rs`, schemathesis) holds the two together.

use serde_json::{Value, json};

use crate::{BODY_LIMIT, DEFAULT_LIMIT, MAX_LIMIT};

/// A JSON error answer with `status`'s meaning.
fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn ok(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn record_id() -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "description": "A record id: 1 to 200 printable ASCII characters, no spaces.",
        "schema": { "type": "string", "pattern": "^[!-~]{1,200}$" }
    })
}

fn limit() -> Value {
    json!({
        "name": "limit", "in": "query", "required": false,
        "schema": { "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT }
    })
}

fn page_token() -> Value {
    json!({
        "name": "page_token", "in": "query", "required": false,
        "description": "The `next_page_token` of the previous page, percent-encoded as any query value (a record id may hold `#`, `&` or `+`).",
        "schema": { "type": "string", "pattern": "^[0-9]{13}[.#][!-~]{0,200}$" }
    })
}

/// The document for a model whose labels are `labels` (the only labels a reviewer may give).
pub(crate) fn document(labels: &[String]) -> Value {
    let confidence = |name: &str| {
        json!({ "name": name, "in": "query", "required": false,
                "schema": { "type": "number", "minimum": 0, "maximum": 1 } })
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "sluice results API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Predictions of the sluice pipeline, and the review of low-confidence ones. Unknown query parameters are refused."
        },
        "paths": {
            "/results/{id}": {
                "get": {
                    "operationId": "getResult",
                    "summary": "One record's result",
                    "parameters": [record_id()],
                    "responses": {
                        "200": ok("The record's result", "Result"),
                        "400": error("The id is not a record id"),
                        "404": error("No result for that record"),
                        "503": error("The result store cannot answer now, or the API is busy (`Retry-After`)")
                    }
                }
            },
            "/results": {
                "get": {
                    "operationId": "listResults",
                    "summary": "Results in the order they were stored, a page at a time",
                    "parameters": [
                        { "name": "status", "in": "query", "required": false,
                          "description": "Without it, every status but rejected (the marker a reviewer's rejection leaves: that record's end is its results DLQ entry)",
                          "schema": { "type": "string", "enum": ["accepted", "review", "reviewed", "rejected"] } },
                        { "name": "class", "in": "query", "required": false, "description": "The predicted class",
                          "schema": { "type": "string" } },
                        { "name": "since", "in": "query", "required": false,
                          "description": "Stored at or after this time: milliseconds since the Unix epoch, an RFC 3339 time in UTC (2026-11-26T09:00:00Z), or an age (2h, 90m, 7d)",
                          "schema": { "anyOf": [
                              { "type": "integer", "minimum": 0, "maximum": 9_999_999_999_999u64 },
                              { "type": "string",
                                "pattern": "^(19[7-9][0-9]|2[01][0-9][0-9])-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z$" },
                              { "type": "string", "pattern": "^[1-9][0-9]{0,4}[smhd]$" }
                          ] } },
                        confidence("min_confidence"),
                        confidence("max_confidence"),
                        limit(),
                        page_token()
                    ],
                    "responses": {
                        "200": ok("A page of results", "Page"),
                        "400": error("A parameter is unknown or out of range"),
                        "503": error("The result store cannot answer now, or the API is busy (`Retry-After`)")
                    }
                }
            },
            "/review": {
                "get": {
                    "operationId": "listReview",
                    "summary": "Results waiting for a person, in the order they were stored",
                    "parameters": [limit(), page_token()],
                    "responses": {
                        "200": ok("A page of results with status review", "Page"),
                        "400": error("A parameter is unknown or out of range"),
                        "503": error("The result store cannot answer now, or the API is busy (`Retry-After`)")
                    }
                }
            },
            "/review/{id}": {
                "post": {
                    "operationId": "labelReview",
                    "summary": "A person's label for a result waiting for review",
                    "parameters": [record_id()],
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Label" } } }
                    },
                    "responses": {
                        "200": ok("The result, now reviewed", "Result"),
                        "400": error("The id, the body or the label is not valid"),
                        "404": error("No result for that record"),
                        "409": error("The result is not waiting for review"),
                        "413": error(&format!("The body is over {BODY_LIMIT} bytes")),
                        "415": error("The body is not declared as JSON"),
                        "422": error("The body is JSON but not a label"),
                        "503": error("The result store cannot answer now, or the API is busy (`Retry-After`)")
                    }
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": { "200": { "description": "The OpenAPI document",
                                            "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            }
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"], "additionalProperties": false,
                    "properties": { "error": { "type": "string" } }
                },
                "Label": {
                    "type": "object", "required": ["label"], "additionalProperties": false,
                    "properties": { "label": { "type": "string", "enum": labels, "description": "One of the model's labels" } }
                },
                "Page": {
                    "type": "object", "required": ["results"], "additionalProperties": false,
                    "properties": {
                        "results": { "type": "array", "items": { "$ref": "#/components/schemas/Result" } },
                        "next_page_token": { "type": "string", "description": "Pass as page_token for the next page; absent on the last. A page reads at most 10,000 results: one whose filters few of them pass holds fewer than limit, or none, and this token" }
                    }
                },
                "Timestamps": {
                    "type": "object", "additionalProperties": false,
                    "description": "Milliseconds since the Unix epoch at which each stage handled the record",
                    "properties": {
                        "produced_ms": { "type": "integer", "minimum": 0 },
                        "ingested_ms": { "type": "integer", "minimum": 0 },
                        "featured_ms": { "type": "integer", "minimum": 0 },
                        "inferred_ms": { "type": "integer", "minimum": 0 },
                        "stored_ms": { "type": "integer", "minimum": 0 }
                    }
                },
                "Result": {
                    "type": "object",
                    "required": ["record_id", "label", "confidence", "probabilities", "model", "model_version", "backend", "status", "timestamps"],
                    "additionalProperties": false,
                    "properties": {
                        "record_id": { "type": "string" },
                        "label": { "type": "string", "description": "The model's label" },
                        "confidence": { "type": "number" },
                        "probabilities": { "type": "array", "items": { "type": "number" } },
                        "model": { "type": "string" },
                        "model_version": { "type": "string" },
                        "backend": { "type": "string", "description": "candle-cpu, candle-cuda or sagemaker-xgboost" },
                        "status": { "type": "string", "enum": ["accepted", "review", "reviewed", "rejected"] },
                        "ground_truth": { "type": "string" },
                        "reviewed_label": { "type": "string", "description": "The label a person gave it" },
                        "reviewed_ms": { "type": "integer", "minimum": 0 },
                        "timestamps": { "$ref": "#/components/schemas/Timestamps" },
                        "attributes": {
                            "type": "object", "additionalProperties": { "type": "string" },
                            "description": "The producer's attributes of the record (its envelope's); a raw stream record's partition key as partition_key"
                        }
                    }
                }
            }
        }
    })
}
